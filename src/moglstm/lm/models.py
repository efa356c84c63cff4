"""Language models behind one interface.

Every model maps time-major token ids to next-token logits and an opaque state::

    logits, state = model(tokens, state)  # tokens (T, B) long -> logits (T, B, V)

``state=None`` means "start from zeros". Recurrent models return their final
hidden state, which the caller hands back (after :func:`detach_state`) with the
next window; the Transformer keeps no state and always returns ``None``. So a
training loop never needs to know which kind of model it drives.

:func:`build_model` turns a :class:`~moglstm.lm.config.ModelConfig` into a model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from moglstm.lm.budget import MAX_SEARCHED_SIZE, largest_fitting, parse_count
from moglstm.lm.config import INIT_FACTORS, INITS, ModelConfig
from moglstm.lm.regularize import DROPOUT_MASKS, LockedDropout
from moglstm.lm.softmax import MixtureOfSoftmaxes
from moglstm.nn import MogrifierLSTM

__all__ = [
    "MODEL_KINDS",
    "RECURRENT_KINDS",
    "LockedDropout",
    "RNNLanguageModel",
    "TransformerLanguageModel",
    "build_model",
    "count_parameters",
    "detach_state",
    "init_official",
    "resolve_sizes",
    "softmax_temperature",
]

logger = logging.getLogger(__name__)

RECURRENT_KINDS = ("mogrifier", "lstm", "gru", "rnn")
MODEL_KINDS = (*RECURRENT_KINDS, "transformer")
POSITIONAL_KINDS = ("sinusoidal", "learned", "none")

# A model's recurrent state: None, a tensor, or (nested) tuples/lists of tensors.
State = Any


def detach_state(state: State) -> State:
    r"""Cut the autograd history of a model state, keeping its structure.

    Works for any state a model here returns: ``None``, a tensor, or tuples,
    lists and dicts of those (nested freely), so truncated backpropagation can
    carry state from one window to the next without knowing the model type.

    Args:
        state: the state returned by a model's ``forward``.

    Returns:
        The same structure with every tensor detached (``None`` stays ``None``).
    """
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, tuple):
        parts = [detach_state(s) for s in state]
        # Named tuples are rebuilt field by field; plain tuples from a list.
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    if isinstance(state, list):
        return [detach_state(s) for s in state]
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    raise TypeError(f"detach_state: unsupported state type {type(state).__name__}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    r"""Number of scalar parameters in ``model``, counting shared (tied) tensors once.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters: model must be an nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_prob(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_tokens(tokens: Any) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a LongTensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens must be a (T, B) LongTensor, got shape {tuple(tokens.shape)} "
            f"and dtype {tokens.dtype}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")


class RNNLanguageModel(nn.Module):
    r"""Recurrent language model: embedding, stacked recurrent layers, softmax layer.

    Each layer is its own module (a one-layer :class:`moglstm.nn.MogrifierLSTM`,
    :class:`torch.nn.LSTM`, :class:`torch.nn.GRU` or tanh :class:`torch.nn.RNN`;
    the torch ones run their fused kernel over time), so the dropout between
    layers can use one mask for the whole window.

    Args:
        vocab_size: number of token types ``V``.
        kind: recurrent core: ``"mogrifier"``, ``"lstm"``, ``"gru"`` or ``"rnn"``.
        hidden_size: units per recurrent layer.
        embedding_size: embedding width; ``None`` means ``hidden_size``.
        num_layers: number of stacked recurrent layers.
        mogrify_rounds: mogrifier rounds (``mogrifier`` only; 0 gives a plain LSTM cell).
        mogrify_rank: rank of the mogrifier matrices; ``None`` for full rank.
        coupled: the Mogrifier layer's coupled-gate variant (``mogrifier`` only).
        peephole: the Mogrifier layer's peephole variant (``mogrifier`` only).
        cap_input_gate: the Mogrifier layer's capped-input-gate variant (``mogrifier`` only).
        tie_weights: share the embedding matrix with the softmax weights; when
            ``embedding_size != hidden_size`` a linear projection from hidden to
            embedding size is inserted before the softmax.
        embedding_dropout: probability of dropping a whole word type (a row of the
            embedding matrix) for a forward call; kept rows are rescaled.
        input_dropout: dropout on the embedding output.
        layer_dropout: dropout between recurrent layers.
        state_dropout: dropout on the hidden state fed back to the next step
            (``mogrifier`` only; passed to the layer).
        output_dropout: dropout on the recurrent output, before the softmax layer.
        implementation: for the mogrifier core, ``moglstm.nn.MogrifierLSTM``'s
            ``implementation`` (``"auto"``, ``"fused"``, ``"reference"`` or ``"triton"``).
        dropout_mask: ``"window"``: every dropout above (and the mixture's) draws one
            mask per forward call, shared by all time steps (variational dropout);
            ``"step"``: a fresh mask at every step. With ``"step"`` and state
            dropout, each Mogrifier layer is run one step per call (slower), since
            the layer draws one state mask per call.
        sum_layer_outputs: the model output is the sum of every layer's output
            (skip connections from each layer to the softmax), not the last one's.
        forget_bias: added to the forget-gate bias of every ``mogrifier``/``lstm``
            layer at initialisation.
        mos_components: ``K > 1`` replaces the softmax with a mixture of ``K``
            softmaxes (:class:`~moglstm.lm.softmax.MixtureOfSoftmaxes`); the model
            then returns log-probabilities in place of logits (see Shape).
        mos_dropout: dropout on the mixture's component vectors (the official code's
            down-projected output dropout inside each component).
        state_dropout_mask: ``"window"`` or ``"step"`` for the state dropout alone;
            ``None`` follows ``dropout_mask``. The official code's
            ``shared_mask_dropout=False`` is ``dropout_mask="step"`` with
            ``state_dropout_mask="window"``: fresh input, between-layer and output
            masks at every step, one state mask per window (the layer runs whole).
        projection_dropout: dropout on the down-projected output, after the
            hidden-to-embedding projection of a tied softmax (no mixture).
        init: ``"default"`` (torch's schemes, embedding ``N(0, 1/E)``) or
            ``"official"``: the official code's variance-scaling truncated normals
            (see :func:`init_official`).
        embedding_init_factor, cell_init_factor, output_init_factor: the variance
            scales of ``init="official"``.

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

        >>> model = RNNLanguageModel(100, kind="lstm", hidden_size=32, num_layers=2)
        >>> logits, state = model(torch.randint(100, (35, 4)))
        >>> logits.shape
        torch.Size([35, 4, 100])
        >>> logits, state = model(torch.randint(100, (35, 4)), detach_state(state))
    """

    stateful = True

    def __init__(
        self,
        vocab_size: int,
        kind: str = "mogrifier",
        hidden_size: int = 256,
        embedding_size: int | None = None,
        num_layers: int = 2,
        mogrify_rounds: int = 5,
        mogrify_rank: int | None = None,
        coupled: bool = False,
        peephole: bool = False,
        cap_input_gate: bool = False,
        tie_weights: bool = True,
        embedding_dropout: float = 0.0,
        input_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        state_dropout: float = 0.0,
        output_dropout: float = 0.0,
        implementation: str = "auto",
        dropout_mask: str = "window",
        sum_layer_outputs: bool = False,
        forget_bias: float = 0.0,
        mos_components: int = 1,
        mos_dropout: float = 0.0,
        state_dropout_mask: str | None = None,
        projection_dropout: float = 0.0,
        init: str = "default",
        embedding_init_factor: float = 1.0,
        cell_init_factor: float = 1.0,
        output_init_factor: float = 1.0,
    ) -> None:
        super().__init__()
        embedding_size = hidden_size if embedding_size is None else embedding_size
        self._check_args(vocab_size, kind, hidden_size, embedding_size, num_layers)
        self._check_mogrifier_args(
            kind, mogrify_rounds, mogrify_rank, coupled, peephole, cap_input_gate
        )
        self._check_dropouts(
            kind,
            embedding_dropout=embedding_dropout,
            input_dropout=input_dropout,
            layer_dropout=layer_dropout,
            state_dropout=state_dropout,
            output_dropout=output_dropout,
            mos_dropout=mos_dropout,
            projection_dropout=projection_dropout,
        )
        self._check_output_args(kind, dropout_mask, forget_bias, mos_components)
        state_dropout_mask = dropout_mask if state_dropout_mask is None else state_dropout_mask
        if state_dropout_mask not in DROPOUT_MASKS:
            raise ValueError(
                f"state_dropout_mask must be None or one of {DROPOUT_MASKS}, "
                f"got {state_dropout_mask!r}"
            )
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        factors = (embedding_init_factor, cell_init_factor, output_init_factor)
        for name, factor in zip(INIT_FACTORS, factors, strict=True):
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"{name} must be a positive number, got {factor!r}")
        self.kind = kind
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size
        self.num_layers = num_layers
        self.embedding_dropout = float(embedding_dropout)
        self.dropout_mask = dropout_mask
        self.state_dropout_mask = state_dropout_mask
        self.sum_layer_outputs = bool(sum_layer_outputs)
        self.temperature = 1.0

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.input_drop = LockedDropout(input_dropout, dropout_mask)
        self.layer_drop = LockedDropout(layer_dropout, dropout_mask)
        self.output_drop = LockedDropout(output_dropout, dropout_mask)
        mogrifier_args = dict(
            mogrify_rounds=mogrify_rounds,
            mogrify_rank=mogrify_rank,
            coupled=coupled,
            peephole=peephole,
            cap_input_gate=cap_input_gate,
            state_dropout=state_dropout,
            implementation=implementation,
        )
        self.layers = nn.ModuleList(
            self._make_layer(embedding_size if i == 0 else hidden_size, mogrifier_args)
            for i in range(num_layers)
        )
        decoder_size = embedding_size if tie_weights else hidden_size
        self.projection: nn.Linear | None = None
        self.mos: MixtureOfSoftmaxes | None = None
        if mos_components > 1:  # the mixture projects hidden -> K component vectors
            self.mos = MixtureOfSoftmaxes(
                hidden_size, decoder_size, mos_components, mos_dropout, dropout_mask
            )
        elif tie_weights and embedding_size != hidden_size:
            self.projection = nn.Linear(hidden_size, embedding_size, bias=False)
        if projection_dropout > 0 and self.projection is None:
            raise ValueError(
                f"projection_dropout={projection_dropout} needs a projection: tie_weights=True, "
                f"embedding_size ({embedding_size}) != hidden_size ({hidden_size}) and no "
                "mixture of softmaxes (whose component dropout is mos_dropout)"
            )
        self.projection_drop = LockedDropout(projection_dropout, dropout_mask)
        self.decoder = nn.Linear(decoder_size, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.tie_weights = tie_weights
        self.init = init
        if init == "official":
            init_official(self, *factors, forget_bias=float(forget_bias))
        else:
            self._init_weights()
            self._add_forget_bias(float(forget_bias))

    @property
    def returns_log_probs(self) -> bool:
        """Whether ``forward`` returns log-probabilities (mixture of softmaxes) not logits."""
        return self.mos is not None

    @staticmethod
    def _check_args(
        vocab_size: int, kind: str, hidden_size: int, embedding_size: int, num_layers: int
    ) -> None:
        _check_int("vocab_size", vocab_size)
        if kind not in RECURRENT_KINDS:
            raise ValueError(f"kind must be one of {RECURRENT_KINDS}, got {kind!r}")
        _check_int("hidden_size", hidden_size)
        _check_int("embedding_size", embedding_size)
        _check_int("num_layers", num_layers)

    @staticmethod
    def _check_mogrifier_args(
        kind: str, rounds: int, rank: int | None, coupled: bool, peephole: bool, cap: bool
    ) -> None:
        _check_int("mogrify_rounds", rounds, minimum=0)
        if rank is not None:
            _check_int("mogrify_rank", rank)
        # The cell variants exist only in the Mogrifier layer.
        for name, flag in (("coupled", coupled), ("peephole", peephole), ("cap_input_gate", cap)):
            if flag and kind != "mogrifier":
                raise ValueError(f"{name}=True needs kind='mogrifier', got kind={kind!r}")

    @staticmethod
    def _check_dropouts(kind: str, **probabilities: float) -> None:
        for name, p in probabilities.items():
            _check_prob(name, p)
        if probabilities["state_dropout"] > 0 and kind != "mogrifier":
            raise ValueError(
                f"state_dropout={probabilities['state_dropout']} needs kind='mogrifier' "
                f"(got kind={kind!r}): only the Mogrifier layer drops the recurrent state "
                "(for an LSTM with state dropout use kind='mogrifier', mogrify_rounds=0)"
            )

    @staticmethod
    def _check_output_args(kind: str, mask: str, forget_bias: float, components: int) -> None:
        if mask not in DROPOUT_MASKS:
            raise ValueError(f"dropout_mask must be one of {DROPOUT_MASKS}, got {mask!r}")
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, (int, float)):
            raise TypeError(f"forget_bias must be a float, got {forget_bias!r}")
        if not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be finite, got {forget_bias}")
        if forget_bias != 0 and kind not in ("mogrifier", "lstm"):
            raise ValueError(
                f"forget_bias={forget_bias} needs a forget gate: kind 'mogrifier' or 'lstm', "
                f"got kind={kind!r}"
            )
        _check_int("mos_components", components)

    def _make_layer(self, input_size: int, mogrifier_args: dict[str, Any]) -> nn.Module:
        if self.kind == "mogrifier":
            return MogrifierLSTM(input_size, self.hidden_size, **mogrifier_args)
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
        _check_int("batch_size", batch_size)
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
        _check_tokens(tokens)
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
        d_model: model width (also the embedding size).
        heads: attention heads; must divide ``d_model``.
        depth: number of blocks.
        ffn_size: feed-forward width; ``None`` means ``4 * d_model``.
        positional: ``"sinusoidal"``, ``"learned"`` or ``"none"``; ``True`` means
            ``"sinusoidal"`` and ``False`` means ``"none"``.
        max_len: longest window accepted.
        dropout: dropout on embeddings, attention weights and block outputs.

    Shape:
        - tokens: ``(T, B)`` long with ``T <= max_len``.
        - logits: ``(T, B, V)``.
    """

    stateful = False

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        heads: int = 4,
        depth: int = 2,
        ffn_size: int | None = None,
        positional: str | bool = "sinusoidal",
        max_len: int = 1024,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        ffn_size = 4 * d_model if ffn_size is None else ffn_size
        positional = self._positional_kind(positional)
        for name, value in (
            ("vocab_size", vocab_size),
            ("d_model", d_model),
            ("heads", heads),
            ("depth", depth),
            ("ffn_size", ffn_size),
            ("max_len", max_len),
        ):
            _check_int(name, value)
        if d_model % heads != 0:
            raise ValueError(f"heads={heads} must divide d_model={d_model}")
        _check_prob("dropout", dropout)
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.max_len = max_len
        self.positional = positional

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position: nn.Embedding | None = None
        if positional == "learned":
            self.position = nn.Embedding(max_len, d_model)
        if positional == "sinusoidal":
            self.register_buffer("sinusoid", _sinusoidal_table(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, heads, ffn_size, dropout, activation="gelu", norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size)
        self.decoder.weight = self.embedding.weight
        self._init_weights()

    @staticmethod
    def _positional_kind(positional: str | bool) -> str:
        if positional is True:
            return "sinusoidal"
        if positional is False:
            return "none"
        if positional not in POSITIONAL_KINDS:
            raise ValueError(f"positional must be one of {POSITIONAL_KINDS}, got {positional!r}")
        return positional

    def _init_weights(self) -> None:
        # Embeddings are scaled by sqrt(d_model) on input, so std d_model**-0.5 gives unit-size
        # inputs and unit-size initial logits through the tied softmax.
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5)
        if self.position is not None:
            nn.init.normal_(self.position.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> None:
        r"""The Transformer keeps no state: always ``None``."""
        _check_int("batch_size", batch_size)
        return None

    def forward(self, tokens: Tensor, state: State = None) -> tuple[Tensor, None]:
        r"""Logits for the next token at every position.

        Args:
            tokens: ``(T, B)`` token ids, ``T <= max_len``.
            state: must be ``None`` (accepted for interface compatibility).

        Returns:
            ``(logits, None)`` with ``logits`` of shape ``(T, B, V)``.
        """
        _check_tokens(tokens)
        if state is not None:
            raise ValueError(
                f"TransformerLanguageModel keeps no state; state must be None, "
                f"got {type(state).__name__}"
            )
        length = tokens.shape[0]
        if length > self.max_len:
            raise ValueError(f"window length {length} exceeds max_len {self.max_len}")
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


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    r"""Build the language model that ``cfg`` describes.

    Args:
        cfg: model configuration; ``cfg.kind`` picks the class: ``"transformer"`` gives a
            :class:`TransformerLanguageModel`, the recurrent kinds an :class:`RNNLanguageModel`
            whose sizes come from :func:`resolve_sizes` (``cfg.num_params`` and
            ``cfg.embedding_ratio``, when set, override ``hidden_size`` and ``embedding_size``).
        vocab_size: number of token types.

    Returns:
        The model, on the default device (the CPU unless a ``torch.device`` context
        says otherwise), in training mode.
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    _check_int("vocab_size", vocab_size)
    if cfg.kind not in MODEL_KINDS:
        raise ValueError(f"cfg.kind must be one of {MODEL_KINDS}, got {cfg.kind!r}")
    if cfg.kind == "transformer":
        if cfg.state_dropout > 0:
            raise ValueError(
                f"state_dropout={cfg.state_dropout} needs kind='mogrifier', got 'transformer'"
            )
        if cfg.positional_kind not in ("sinusoidal", "learned"):
            raise ValueError(
                "cfg.positional_kind must be 'sinusoidal' or 'learned', "
                f"got {cfg.positional_kind!r}"
            )
        positional = cfg.positional_kind if cfg.positional else "none"
        return TransformerLanguageModel(
            vocab_size,
            d_model=cfg.d_model,
            heads=cfg.heads,
            depth=cfg.depth,
            ffn_size=cfg.ffn_size,
            positional=positional,
            max_len=cfg.max_len,
            dropout=cfg.dropout,
        )
    hidden_size, embedding_size = resolve_sizes(cfg, vocab_size)
    return RNNLanguageModel(vocab_size, **_recurrent_args(cfg, hidden_size, embedding_size))


def _recurrent_args(cfg: ModelConfig, hidden_size: int, embedding_size: int | None) -> dict:
    return dict(
        kind=cfg.kind,
        hidden_size=hidden_size,
        embedding_size=embedding_size,
        num_layers=cfg.num_layers,
        mogrify_rounds=cfg.mogrify_rounds,
        mogrify_rank=cfg.mogrify_rank,
        coupled=cfg.coupled,
        peephole=cfg.peephole,
        cap_input_gate=cfg.cap_input_gate,
        tie_weights=cfg.tie_weights,
        embedding_dropout=cfg.embedding_dropout,
        input_dropout=cfg.input_dropout,
        layer_dropout=cfg.layer_dropout,
        state_dropout=cfg.state_dropout,
        output_dropout=cfg.output_dropout,
        implementation=cfg.implementation,
        dropout_mask=cfg.dropout_mask,
        sum_layer_outputs=cfg.sum_layer_outputs,
        forget_bias=cfg.forget_bias,
        mos_components=cfg.mos_components,
        mos_dropout=cfg.mos_dropout,
        state_dropout_mask=cfg.state_dropout_mask,
        projection_dropout=cfg.projection_dropout,
        init=cfg.init,
        embedding_init_factor=cfg.embedding_init_factor,
        cell_init_factor=cfg.cell_init_factor,
        output_init_factor=cfg.output_init_factor,
    )


def _embedding_size(cfg: ModelConfig, hidden_size: int) -> int | None:
    if cfg.embedding_ratio is None:
        return cfg.embedding_size
    return max(1, round(cfg.embedding_ratio * hidden_size))


def resolve_sizes(cfg: ModelConfig, vocab_size: int) -> tuple[int, int | None]:
    r"""The ``(hidden_size, embedding_size)`` a recurrent model of ``cfg`` is built with.

    ``cfg.embedding_ratio`` sets the embedding size from the hidden size; with
    ``cfg.num_params`` the hidden size is the largest whose model (with every
    other setting of ``cfg``) has at most that many parameters, found by binary
    search over models built on the ``meta`` device (nothing is allocated), so the
    count is exact. ``embedding_size`` ``None`` means "the hidden size".

    Args:
        cfg: a recurrent model's configuration.
        vocab_size: number of token types.

    Raises:
        ValueError: the budget is too small for any hidden size.
    """
    _check_int("vocab_size", vocab_size)
    if cfg.num_params is None:
        return cfg.hidden_size, _embedding_size(cfg, cfg.hidden_size)
    budget = parse_count(cfg.num_params)
    try:
        hidden = largest_fitting(lambda h: _count_on_meta(cfg, vocab_size, h), budget)
    except ValueError as exc:
        raise ValueError(f"model.num_params={cfg.num_params!r}: {exc}") from exc
    if hidden == MAX_SEARCHED_SIZE:  # the budget allows more than any size searched
        most = _count_on_meta(cfg, vocab_size, hidden)
        raise ValueError(
            f"model.num_params={cfg.num_params!r} is more than the largest model considered "
            f"(hidden size {hidden:,}: {most:,} parameters); give a smaller budget"
        )
    logger.info("model.num_params=%s: hidden size %d", cfg.num_params, hidden)
    return hidden, _embedding_size(cfg, hidden)


def _count_on_meta(cfg: ModelConfig, vocab_size: int, hidden_size: int) -> int | None:
    """Parameters of the model with this hidden size; ``None`` if it cannot be built."""
    embedding = _embedding_size(cfg, hidden_size) or hidden_size
    rank = cfg.mogrify_rank if cfg.kind == "mogrifier" and cfg.mogrify_rounds else None
    if rank is not None and not rank < min(hidden_size, embedding):
        return None  # a mogrifier rank must be below both sizes it connects
    args = _recurrent_args(cfg, hidden_size, embedding)
    with torch.device("meta"), _SkipMetaInPlace():
        # trainable only: init="official" freezes bias_hh (the official cell has one bias)
        return count_parameters(RNNLanguageModel(vocab_size, **args), trainable_only=True)


def build_on_meta(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """:func:`build_model` on the ``meta`` device: every parameter's shape, no memory.

    For checks before the real model is built: its parameter count, the shapes a
    checkpoint's weights must have.
    """
    with torch.device("meta"), _SkipMetaInPlace():
        return build_model(cfg, vocab_size)


class _SkipMetaInPlace(TorchFunctionMode):
    """Skip in-place ops (``normal_``, ``uniform_``, ...) on meta tensors.

    Initialising meta tensors computes nothing, yet their Python decompositions
    cost milliseconds each; skipping them makes counting a model on the meta device
    about 20 times faster (the budget search builds ~30 models).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        # torch.nn.init passes the tensor by keyword (``tensor=``)
        first = args[0] if args else (kwargs or {}).get("tensor")
        if name.endswith("_") and not name.startswith("_") and _is_meta(first):
            return first
        return func(*args, **(kwargs or {}))


def _is_meta(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_meta
