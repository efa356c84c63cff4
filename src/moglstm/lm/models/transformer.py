"""The causal Transformer language model (the baseline the Mogrifier is compared with)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moglstm.lm.errors import UserError
from moglstm.lm.models.checks import check_int, check_tokens
from moglstm.lm.state import State

if TYPE_CHECKING:
    from moglstm.lm.config import TransformerSettings

__all__ = ["TransformerLanguageModel"]


def _sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    # (max_len, d_model): sin on even features, cos on odd ones (Vaswani et al., 2017).
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(1e4) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table


class TransformerLanguageModel(nn.Module):
    r"""Causal (decoder-only) Transformer language model with tied embeddings.

    Pre-layer-norm blocks of :class:`torch.nn.TransformerEncoderLayer` under a
    causal mask, so the logits at position ``t`` depend only on tokens ``0..t``.
    The model keeps no state between windows: ``state`` must be ``None`` and the
    returned state is always ``None``.

    Args:
        vocab_size: number of token types ``V``.
        config: the Transformer's settings, a
            :class:`~moglstm.lm.config.TransformerSettings`: ``d_model`` (model width,
            also the embedding size), ``heads`` (must divide ``d_model``), ``depth``
            (blocks), ``ffn_size`` (``None``: ``4 * d_model``), ``positional`` and
            ``positional_kind`` (``"sinusoidal"`` or ``"learned"`` position
            information, or none), ``max_len`` (longest window accepted) and
            ``dropout`` (on embeddings, attention weights and block outputs). Checked
            by :func:`~moglstm.lm.config.check_model`, every problem at once.

    Shape:
        - tokens: ``(T, B)`` long with ``T <= max_len``.
        - logits: ``(T, B, V)``.
    """

    stateful = False

    def __init__(self, vocab_size: int, config: TransformerSettings) -> None:
        super().__init__()
        from moglstm.lm.config import ModelConfig, TransformerSettings, check_model

        if not isinstance(config, TransformerSettings):
            raise TypeError(f"config must be a TransformerSettings, got {type(config).__name__}")
        check_int("vocab_size", vocab_size)
        check_model(ModelConfig(kind="transformer", transformer=config))
        t = config
        d_model = t.d_model
        ffn_size = 4 * d_model if t.ffn_size is None else t.ffn_size
        positional = t.positional_kind if t.positional else "none"
        self.config = config
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_len = t.max_len
        self.positional = positional

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position: nn.Embedding | None = None
        if positional == "learned":
            self.position = nn.Embedding(t.max_len, d_model)
        if positional == "sinusoidal":
            table = _sinusoidal_table(t.max_len, d_model)
            self.register_buffer("sinusoid", table, persistent=False)
        self.drop = nn.Dropout(t.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, t.heads, ffn_size, t.dropout, activation="gelu", norm_first=True
            )
            for _ in range(t.depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)
        self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # Embeddings are scaled by sqrt(d_model) on input, so std d_model**-0.5 gives unit-size
        # inputs and unit-size initial logits through the tied softmax.
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5)
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> None:
        r"""The Transformer keeps no state: always ``None``."""
        check_int("batch_size", batch_size)
        return None

    def forward(self, tokens: Tensor, state: State = None) -> tuple[Tensor, None]:
        r"""Logits for the next token at every position.

        Args:
            tokens: ``(T, B)`` token ids, ``T <= max_len``.
            state: must be ``None`` (accepted for interface compatibility).

        Returns:
            ``(logits, None)`` with ``logits`` of shape ``(T, B, V)``.
        """
        check_tokens(tokens)
        if state is not None:
            raise ValueError(
                f"TransformerLanguageModel keeps no state; state must be None, "
                f"got {type(state).__name__}"
            )
        length = tokens.shape[0]
        if length > self.max_len:
            raise UserError(f"window length {length} exceeds max_len {self.max_len}")
        x = self.embedding(tokens) * math.sqrt(self.d_model)  # (T, B, D)
        if self.position is not None:
            x = x + self.position.weight[:length].unsqueeze(1)
        elif self.positional == "sinusoidal":
            x = x + self.sinusoid[:length].unsqueeze(1).to(x.dtype)
        x = self.drop(x)
        # True above the diagonal: position t may not attend to t+1 and later.
        mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu_(1)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.decoder(self.norm(x)), None


