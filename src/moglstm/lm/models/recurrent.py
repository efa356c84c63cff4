"""The recurrent language model and the official code's initialisation of it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moglstm.lm.errors import UserError
from moglstm.lm.layers import LockedDropout, MixtureOfSoftmaxes
from moglstm.lm.models.checks import check_int, check_tokens
from moglstm.lm.models.kinds import RECURRENT_KINDS
from moglstm.lm.state import State
from moglstm.nn import MogrifierLSTM

if TYPE_CHECKING:
    from moglstm.lm.config import ModelConfig

__all__ = ["RNNLanguageModel", "init_official", "softmax_temperature"]


def _embedding_size(cfg: ModelConfig, hidden_size: int) -> int | None:
    if cfg.embedding_ratio is None:
        return cfg.embedding_size
    return max(1, round(cfg.embedding_ratio * hidden_size))


class RNNLanguageModel(nn.Module):
    r"""Recurrent language model: embedding, stacked recurrent layers, softmax layer.

    Each layer is its own module (a one-layer :class:`moglstm.nn.MogrifierLSTM`,
    :class:`torch.nn.LSTM`, :class:`torch.nn.GRU` or tanh :class:`torch.nn.RNN`;
    the torch ones run their fused kernel over time), so the dropout between
    layers can use one mask for the whole window.

    Args:
        vocab_size: number of token types ``V``.
        config: the whole model section, a :class:`~moglstm.lm.config.ModelConfig`
            (build one with :func:`~moglstm.lm.config.model_config`, which takes old
            flat names too). It is checked by
            :func:`~moglstm.lm.config.check_model`, every problem at once. What each
            field does is documented on the dataclasses; in short: ``kind`` picks the
            core, ``hidden_size``/``embedding_size``/``num_layers`` the sizes
            (``embedding_ratio`` sets the embedding from the hidden size; a
            ``num_params`` budget is solved by :func:`build_model`), the dropouts act
            where their names say (``embedding_dropout`` drops whole word types, rows
            of the embedding; ``state_dropout`` the Mogrifier layer's fed-back ``h``),
            ``dropout_mask="window"`` draws one mask per forward call shared by all
            steps (variational) and ``"step"`` a fresh one per step (with state dropout
            each Mogrifier layer then runs one step per call, slower, since the layer
            draws one state mask per call); ``state_dropout_mask`` overrides it for the
            state dropout alone (the official ``shared_mask_dropout=False`` is
            ``dropout_mask="step"``, ``state_dropout_mask="window"``);
            ``config.mogrifier`` holds the layer's own settings; ``config.output`` the
            softmax's: tied weights (a hidden-to-embedding projection is inserted when
            the sizes differ), ``mos_components > 1`` a mixture of softmaxes
            (:class:`~moglstm.lm.layers.MixtureOfSoftmaxes`; the model then returns
            log-probabilities, see Shape), the sum of every layer's output as the
            model's output; ``forget_bias`` is added to the forget gate's bias
            (mogrifier/lstm) and ``init="official"`` uses :func:`init_official`.

    Attributes:
        temperature: the softmax temperature ``T`` the model applies itself (default
            1): logits are divided by ``T``; with a mixture of softmaxes every
            component's logits are, before its softmax, as the official code does
            (mixture weights untouched). Set it with :func:`softmax_temperature`.

    Shape:
        - tokens: ``(T, B)`` long.
        - logits: ``(T, B, V)``. With ``mos_components > 1`` these are
          log-probabilities; they can be used as logits everywhere (cross-entropy,
          sampling, temperatures), as ``log_softmax`` leaves them unchanged.
        - state: a list with one entry per layer: ``(h, c)`` with ``h, c`` of shape
          ``(1, B, hidden_size)`` for ``mogrifier``/``lstm``, ``h`` alone for
          ``gru``/``rnn``. Treat it as opaque.

    Example::

        >>> model = RNNLanguageModel(100, model_config(kind="lstm", hidden_size=32))
        >>> logits, state = model(torch.randint(100, (35, 4)))
        >>> logits.shape
        torch.Size([35, 4, 100])
        >>> logits, state = model(torch.randint(100, (35, 4)), detach_state(state))
    """

    stateful = True

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        from moglstm.lm.config import check_model  # the config imports this package

        check_int("vocab_size", vocab_size)
        check_model(config)
        if config.kind not in RECURRENT_KINDS:
            raise UserError(
                f"model.kind={config.kind!r}: an RNNLanguageModel is one of {RECURRENT_KINDS}"
            )
        if config.num_params is not None:
            raise UserError(
                f"model.num_params={config.num_params!r}: build_model solves the hidden size "
                "of a parameter budget; RNNLanguageModel takes model.hidden_size"
            )
        m, out = config, config.output
        hidden_size = m.hidden_size
        embedding_size = _embedding_size(m, hidden_size) or hidden_size
        mask = m.dropout_mask
        self.config = config
        self.kind = m.kind
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size
        self.num_layers = m.num_layers
        self.embedding_dropout = float(m.embedding_dropout)
        self.dropout_mask = mask
        self.state_dropout_mask = mask if m.state_dropout_mask is None else m.state_dropout_mask
        self.sum_layer_outputs = bool(out.sum_layer_outputs)
        self.temperature = 1.0

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.input_drop = LockedDropout(m.input_dropout, mask)
        self.layer_drop = LockedDropout(m.layer_dropout, mask)
        self.output_drop = LockedDropout(m.output_dropout, mask)
        self.layers = nn.ModuleList(
            self._make_layer(embedding_size if i == 0 else hidden_size, m)
            for i in range(m.num_layers)
        )
        decoder_size = embedding_size if out.tie_weights else hidden_size
        self.projection: nn.Linear | None = None
        self.mos: MixtureOfSoftmaxes | None = None
        if out.mos_components > 1:  # the mixture projects hidden -> K component vectors
            self.mos = MixtureOfSoftmaxes(
                hidden_size, decoder_size, out.mos_components, out.mos_dropout, mask
            )
        elif out.tie_weights and embedding_size != hidden_size:
            self.projection = nn.Linear(hidden_size, embedding_size, bias=False)
        if out.projection_dropout > 0 and self.projection is None:
            raise UserError(
                f"model.output.projection_dropout={out.projection_dropout} needs a projection: "
                f"tie_weights=True, embedding_size ({embedding_size}) != hidden_size "
                f"({hidden_size}) and no mixture of softmaxes (whose component dropout is "
                "mos_dropout)"
            )
        self.projection_drop = LockedDropout(out.projection_dropout, mask)
        self.decoder = nn.Linear(decoder_size, vocab_size)
        if out.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.tie_weights = out.tie_weights
        self.init = m.init
        if m.init == "official":
            factors = (m.embedding_init_factor, m.cell_init_factor, m.output_init_factor)
            init_official(self, *factors, forget_bias=float(m.forget_bias))
        else:
            self._init_weights()
            self._add_forget_bias(float(m.forget_bias))

    @property
    def returns_log_probs(self) -> bool:
        """Whether ``forward`` returns log-probabilities (mixture of softmaxes) not logits."""
        return self.mos is not None

    def _make_layer(self, input_size: int, m: ModelConfig) -> nn.Module:
        if self.kind == "mogrifier":
            g = m.mogrifier
            return MogrifierLSTM(
                input_size,
                self.hidden_size,
                mogrify_rounds=g.rounds,
                mogrify_rank=g.rank,
                coupled=g.coupled,
                peephole=g.peephole,
                cap_input_gate=g.cap_input_gate,
                state_dropout=m.state_dropout,
                implementation=g.implementation,
            )
        if self.kind == "lstm":
            return nn.LSTM(input_size, self.hidden_size)
        if self.kind == "gru":
            return nn.GRU(input_size, self.hidden_size)
        return nn.RNN(input_size, self.hidden_size, nonlinearity="tanh")

    def _init_weights(self) -> None:
        # std E**-0.5: unit-norm embedding rows, so the tied softmax starts with logits of
        # order one, yet inputs large enough that small models leave the unigram plateau.
        nn.init.normal_(self.embedding.weight, std=self.embedding_size**-0.5)
        nn.init.zeros_(self.decoder.bias)

    @torch.no_grad()
    def _add_forget_bias(self, value: float) -> None:
        if value == 0:
            return
        h = self.hidden_size
        for layer in self.layers:
            # gates are (i, f, g, o) as in torch.nn.LSTM; the coupled cell has (f, g, o)
            rows = slice(0, h) if getattr(layer, "coupled", False) else slice(h, 2 * h)
            layer.bias_hh_l0[rows] += value

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        r"""All-zero state for ``batch_size`` sequences (the same as passing ``None``)."""
        check_int("batch_size", batch_size)
        dtype = self.embedding.weight.dtype
        shape = (1, batch_size, self.hidden_size)
        state: list[Any] = []
        for _ in range(self.num_layers):
            h = torch.zeros(shape, device=device, dtype=dtype)
            state.append((h, torch.zeros_like(h)) if self.kind in ("mogrifier", "lstm") else h)
        return state

    def _embed(self, tokens: Tensor) -> Tensor:
        emb = self.embedding(tokens)  # (T, B, E)
        p = self.embedding_dropout
        if self.training and p > 0:
            # One keep/drop draw per word type, looked up per token: the same as
            # zeroing rows of the embedding matrix, without copying the matrix.
            keep = emb.new_empty(self.vocab_size).bernoulli_(1.0 - p).div_(1.0 - p)  # (V,)
            emb = emb * keep[tokens].unsqueeze(-1)
        return emb

    def _layer_states(self, state: State) -> list[Any]:
        if state is None:
            return [None] * self.num_layers
        if not isinstance(state, (list, tuple)) or len(state) != self.num_layers:
            raise ValueError(
                f"state must be None or a list of {self.num_layers} per-layer states "
                f"(as returned by forward or init_state), got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, (list, tuple)) else "")
            )
        return list(state)

    def _run_layer(self, layer: nn.Module, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        stepwise = (
            self.training
            and self.state_dropout_mask == "step"
            and getattr(layer, "state_dropout", 0.0) > 0
        )
        if not stepwise:
            return layer(x, state)
        outputs = []
        for t in range(x.size(0)):  # one call per step: the layer draws a fresh state mask
            out, state = layer(x[t : t + 1], state)  # out: (1, B, H)
            outputs.append(out)
        return torch.cat(outputs), state

    def forward(self, tokens: Tensor, state: State = None) -> tuple[Tensor, State]:
        r"""Logits (log-probabilities with a mixture of softmaxes) and the final state.

        Args:
            tokens: ``(T, B)`` token ids.
            state: the state from the previous window, or ``None`` for zeros.

        Returns:
            ``(logits, state)`` with ``logits`` of shape ``(T, B, V)``.
        """
        check_tokens(tokens)
        states = self._layer_states(state)
        x = self.input_drop(self._embed(tokens))  # (T, B, E)
        new_states = []
        total = None  # sum of the layer outputs, for sum_layer_outputs
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = self.layer_drop(x)
            x, s = self._run_layer(layer, x, states[i])  # x: (T, B, H)
            new_states.append(s)
            total = x if total is None else total + x
        x = self.output_drop(total if self.sum_layer_outputs else x)  # (T, B, H)
        if self.mos is not None:  # log-probabilities
            return self.mos(x, self.decoder, temperature=self.temperature), new_states
        if self.projection is not None:
            x = self.projection_drop(self.projection(x))  # (T, B, E)
        logits = self.decoder(x)
        return (logits if self.temperature == 1.0 else logits / self.temperature), new_states



# The standard deviation of a unit normal truncated at +-2: tf.variance_scaling_initializer
# divides by it so that the truncated draws have the variance asked for.
_TF_TRUNCATION = 0.87962566103423978
# lamb.utils.variance_scaling_initializer (used for the recurrent cell) multiplies the
# variance by 1.3 instead (1 / 0.8796**2 = 1.2925).
_LAMB_TRUNCATION_VARIANCE = 1.3


def _truncated_normal_(t: Tensor, std: float, mean: float | Tensor = 0.0) -> None:
    # as tf.truncated_normal: redrawn outside two standard deviations of the mean
    nn.init.trunc_normal_(t, 0.0, std, -2.0 * std, 2.0 * std)
    t.add_(mean)


@torch.no_grad()
def init_official(
    model: RNNLanguageModel,
    embedding_factor: float = 1.0,
    cell_factor: float = 1.0,
    output_factor: float = 1.0,
    *,
    forget_bias: float = 0.0,
) -> None:
    r"""Initialise ``model`` as the official Mogrifier code (deepmind/lamb) does.

    Every draw is a normal truncated at two standard deviations:

    * embedding ``(V, E)``: ``std = sqrt(embedding_factor / E) / 0.8796`` (TF's
      variance scaling, fan-out; a tied softmax shares it);
    * untied softmax weight ``(V, O)``: ``std = sqrt(output_factor / O) / 0.8796``
      (fan-in); softmax bias 0; the mixture of softmaxes' projection and mixture
      weights likewise with fan-in ``H``, their bias 0; the hidden-to-embedding
      projection of a tied softmax: orthogonal;
    * each recurrent layer: ``weight_ih`` ``std = sqrt(1.3 cell_factor / in)``,
      ``weight_hh`` ``sqrt(1.3 cell_factor / H)``; the gate biases ``bias_ih`` with
      ``std = sqrt(1.3 cell_factor / H)``, the forget gate's around ``forget_bias``
      (its mean); ``bias_hh`` is zero and frozen (``requires_grad=False``): the
      official cell has one bias per gate, trained and penalised once;
    * Mogrifier rounds: full matrices ``std = sqrt(1.3 cell_factor / in)``; low-rank
      factors (both) ``std = (in * k) ** -0.25`` (unscaled); biases 0.

    Args:
        model: a recurrent language model of kind ``"mogrifier"`` or ``"lstm"``.
        embedding_factor, cell_factor, output_factor: the variance scales
            (``embedding_init_factor``, ``cell_init_factor``, ``output_init_factor``).
        forget_bias: the mean of the forget gate's bias.
    """
    if model.kind not in ("mogrifier", "lstm"):
        raise ValueError(f"init_official: kind must be 'mogrifier' or 'lstm', got {model.kind!r}")
    h = model.hidden_size
    for layer in model.layers:
        layer.bias_hh_l0.requires_grad = False  # attribute, not requires_grad_(): see _count
    if model.embedding.weight.is_meta:  # counting parameters: nothing to draw
        return
    _truncated_normal_(
        model.embedding.weight, math.sqrt(embedding_factor / model.embedding_size) / _TF_TRUNCATION
    )
    if not model.tie_weights:
        fan_in = model.decoder.in_features
        _truncated_normal_(model.decoder.weight, math.sqrt(output_factor / fan_in) / _TF_TRUNCATION)
    nn.init.zeros_(model.decoder.bias)
    if model.projection is not None:
        nn.init.orthogonal_(model.projection.weight)
    if model.mos is not None:
        std = math.sqrt(output_factor / h) / _TF_TRUNCATION
        _truncated_normal_(model.mos.latent.weight, std)
        _truncated_normal_(model.mos.prior.weight, std)
        nn.init.zeros_(model.mos.latent.bias)
    for layer in model.layers:
        _init_official_layer(layer, h, cell_factor, forget_bias)


def _init_official_layer(layer: nn.Module, h: int, factor: float, forget_bias: float) -> None:
    def std(fan_in: int) -> float:
        return math.sqrt(_LAMB_TRUNCATION_VARIANCE * factor / fan_in)

    _truncated_normal_(layer.weight_ih_l0, std(layer.weight_ih_l0.shape[1]))
    _truncated_normal_(layer.weight_hh_l0, std(h))
    # gates (i, f, g, o) as in torch.nn.LSTM; the coupled cell has (f, g, o)
    forget = slice(0, h) if getattr(layer, "coupled", False) else slice(h, 2 * h)
    mean = torch.zeros_like(layer.bias_ih_l0)
    mean[forget] = forget_bias
    _truncated_normal_(layer.bias_ih_l0, std(h), mean)
    nn.init.zeros_(layer.bias_hh_l0)
    mogrifier = getattr(layer, "mogrifier_l0", None)
    if mogrifier is None:
        return
    for i in range(1, mogrifier.rounds + 1):
        _, fan_in = mogrifier.round_shape(i)
        if mogrifier.rank is None:
            _truncated_normal_(getattr(mogrifier, f"weight_{i}"), std(fan_in))
        else:  # lamb's low-rank factors: each entry of the product has variance 1/fan_in
            low_rank_std = (fan_in * mogrifier.rank) ** -0.25
            _truncated_normal_(getattr(mogrifier, f"weight_{i}_left"), low_rank_std)
            _truncated_normal_(getattr(mogrifier, f"weight_{i}_right"), low_rank_std)
        if mogrifier.bias:
            nn.init.zeros_(getattr(mogrifier, f"bias_{i}"))


@contextlib.contextmanager
def softmax_temperature(model: nn.Module, temperature: float) -> Iterator[bool]:
    r"""Within the block ``model`` applies the softmax temperature itself, if it can.

    A recurrent model divides its logits by ``temperature``, and with a mixture of
    softmaxes divides each component's logits before that component's softmax, as
    the official code does (its ``softmax_temperature`` multiplies the logits by
    ``1 / temperature`` in these terms). Dividing the mixture's log-probabilities
    instead would be a different distribution.

    Yields:
        ``True`` when the model applies it (the caller must not divide again),
        ``False`` for models without the attribute (the caller divides the logits).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not hasattr(model, "temperature"):
        yield False
        return
    saved = model.temperature
    model.temperature = float(temperature)
    try:
        yield True
    finally:
        model.temperature = saved


