"""One layer direction, described once for every implementation.

:class:`DirectionSpec` is the static part (sizes, rounds and their ranks, variant flags):
hashable, and encodable as a list of ints for a custom op's schema.
:class:`Direction` is the spec with its weights. Every backend of
:mod:`moglstm.nn.backends` takes a :class:`Direction`; the fused ones hand its weights to
their autograd node as the flat tensor list of :meth:`Direction.flat` and read them back
with :meth:`Direction.from_flat`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from torch import Tensor

from moglstm.nn import functional as mf  # moglstm's; "F" is always torch's


@dataclass(frozen=True)
class DirectionSpec:
    """The static shape of a layer direction.

    ``ranks`` holds one entry per Mogrifier round: the rank ``k`` of a low-rank round
    ``left (out, k) @ right (k, in)``, or ``None`` for a full matrix ``(out, in)``.
    """

    input_size: int
    hidden_size: int
    ranks: tuple[int | None, ...]
    round_bias: bool
    bias: bool
    coupled: bool
    peephole: bool
    cap_input_gate: bool

    @property
    def rounds(self) -> int:
        return len(self.ranks)

    @property
    def low_rank(self) -> bool:
        return bool(self.ranks) and self.ranks[0] is not None

    @property
    def gate_rows(self) -> int:
        """Rows of ``weight_hh``: ``4H``, or ``3H`` when coupled (no input gate)."""
        return (3 if self.coupled else 4) * self.hidden_size

    def round_shape(self, r: int) -> tuple[int, int]:
        """``(out, in)`` of round ``r`` (from 0): odd rounds (r even) gate x from h."""
        I, H = self.input_size, self.hidden_size
        return (I, H) if r % 2 == 0 else (H, I)

    def encode(self) -> list[int]:
        """The spec as ints (a rank of 0 means full rank), for a custom op's schema."""
        head = [self.input_size, self.hidden_size, len(self.ranks)]
        flags = [int(getattr(self, f.name)) for f in fields(self)[3:]]
        return head + [0 if k is None else k for k in self.ranks] + flags

    @classmethod
    def decode(cls, ints: list[int]) -> DirectionSpec:
        I, H, n = ints[:3]
        ranks = tuple(None if k == 0 else k for k in ints[3 : 3 + n])
        flags = [bool(v) for v in ints[3 + n :]]
        return cls(I, H, ranks, *flags)


@dataclass
class RoundWeights:
    """One Mogrifier round: ``weight`` (out, in) or ``left (out, k) @ right (k, in)``."""

    left: Tensor
    right: Tensor | None
    bias: Tensor | None

    def as_functional(self) -> mf.RoundWeight:
        return self.left if self.right is None else (self.left, self.right)


@dataclass
class Direction:
    """A layer direction's spec and weights, with ``torch.nn.LSTM``'s names for the LSTM.

    ``peephole`` is ``(w_ci or None if coupled, w_cf, w_co)`` or ``None``.
    """

    spec: DirectionSpec
    rounds: list[RoundWeights]
    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None
    peephole: tuple[Tensor | None, Tensor, Tensor] | None
    weight_hr: Tensor | None = None  # proj_size's projection (P, H): the reference only

    @classmethod
    def build(
        cls,
        round_weights: list[mf.RoundWeight],
        round_biases: list[Tensor | None],
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None,
        bias_hh: Tensor | None,
        peephole: tuple[Tensor | None, Tensor, Tensor] | None,
        coupled: bool,
        cap_input_gate: bool,
        weight_hr: Tensor | None = None,
    ) -> Direction:
        rounds = [
            RoundWeights(*(w if isinstance(w, tuple) else (w, None)), b)
            for w, b in zip(round_weights, round_biases, strict=True)
        ]
        spec = DirectionSpec(
            input_size=weight_ih.shape[1],
            hidden_size=weight_hh.shape[0] // (3 if coupled else 4),  # shape[1] is P with proj
            ranks=tuple(None if r.right is None else r.right.shape[0] for r in rounds),
            round_bias=bool(rounds) and rounds[0].bias is not None,
            bias=bias_ih is not None,
            coupled=coupled,
            peephole=peephole is not None,
            cap_input_gate=cap_input_gate,
        )
        return cls(spec, rounds, weight_ih, weight_hh, bias_ih, bias_hh, peephole, weight_hr)

    # -- the functional (reference) view

    def round_weights(self) -> list[mf.RoundWeight]:
        return [r.as_functional() for r in self.rounds]

    def round_biases(self) -> list[Tensor | None]:
        return [r.bias for r in self.rounds]

    def variants(self) -> dict:
        """The variant keyword arguments of :func:`moglstm.nn.functional.lstm_cell`."""
        return {
            "peephole": self.peephole,
            "coupled": self.spec.coupled,
            "cap_input_gate": self.spec.cap_input_gate,
        }

    # -- the flat view a fused autograd node takes

    def flat(self) -> list[Tensor]:
        """Every weight tensor in a fixed order: per round ``left, [right], [bias]``, then
        ``weight_ih, weight_hh, [bias_ih, bias_hh], [w_ci], [w_cf, w_co]``."""
        out: list[Tensor] = []
        for r in self.rounds:
            out += [t for t in (r.left, r.right, r.bias) if t is not None]
        out += [self.weight_ih, self.weight_hh]
        if self.spec.bias:
            out += [self.bias_ih, self.bias_hh]
        if self.peephole is not None:
            out += [p for p in self.peephole if p is not None]
        return out

    @classmethod
    def from_flat(cls, spec: DirectionSpec, flat: tuple[Tensor, ...] | list[Tensor]) -> Direction:
        it = iter(flat)
        rounds = [
            RoundWeights(
                next(it),
                next(it) if spec.low_rank else None,
                next(it) if spec.round_bias else None,
            )
            for _ in range(spec.rounds)
        ]
        weight_ih, weight_hh = next(it), next(it)
        bias_ih, bias_hh = (next(it), next(it)) if spec.bias else (None, None)
        peephole = None
        if spec.peephole:
            peephole = (None if spec.coupled else next(it), next(it), next(it))
        if next(it, None) is not None:
            raise ValueError(f"more weight tensors than a {spec} takes")
        return cls(spec, rounds, weight_ih, weight_hh, bias_ih, bias_hh, peephole)

    @functools.cached_property
    def gates_bias(self) -> Tensor | None:
        """``bias_ih + bias_hh`` (computed once), or None."""
        return None if self.bias_ih is None else self.bias_ih + self.bias_hh


@dataclass
class Steps:
    """A layer's input as steps: ``x`` is ``(T, B, I)``, or packed data ``(N, I)`` with
    ``batch_sizes`` (a list of ints, non-increasing) for variable lengths."""

    x: Tensor
    batch_sizes: list[int] | None

    @property
    def length(self) -> int:
        return self.x.shape[0] if self.batch_sizes is None else len(self.batch_sizes)

    def slices(self) -> list[tuple[int, int]]:
        """``(offset, n)`` of each step's rows in packed data."""
        out, offset = [], 0
        for n in self.batch_sizes:
            out.append((offset, n))
            offset += n
        return out
