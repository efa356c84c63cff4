"""The Mogrifier LSTM cell, called like ``torch.nn.LSTMCell``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moglstm.nn import functional as mf  # moglstm's; "F" is always torch's
from moglstm.nn._checks import (
    check_floating,
    check_like,
    check_positive_int,
    check_rank,
    check_rounds,
    check_shape,
    check_tensor,
)
from moglstm.nn.mogrifier import Mogrifier


def lstm_parameter_shapes(
    input_size: int,
    hidden_size: int,
    bias: bool,
    coupled: bool,
    peephole: bool,
    proj_size: int = 0,
) -> dict[str, tuple[int, ...]]:
    """Names (torch's, without layer suffix) and shapes of one LSTM's parameters, in
    :class:`torch.nn.LSTM`'s order (``weight_ih, weight_hh, bias_ih, bias_hh, weight_hr``),
    then the peepholes."""
    gates = 3 if coupled else 4
    shapes: dict[str, tuple[int, ...]] = {
        "weight_ih": (gates * hidden_size, input_size),
        "weight_hh": (gates * hidden_size, proj_size or hidden_size),
    }
    if bias:
        shapes["bias_ih"] = (gates * hidden_size,)
        shapes["bias_hh"] = (gates * hidden_size,)
    if proj_size:
        shapes["weight_hr"] = (proj_size, hidden_size)
    if peephole:
        if not coupled:
            shapes["weight_ci"] = (hidden_size,)
        shapes["weight_cf"] = (hidden_size,)
        shapes["weight_co"] = (hidden_size,)
    return shapes


def check_variants(coupled: bool, cap_input_gate: bool) -> None:
    if coupled and cap_input_gate:
        raise ValueError(
            "cap_input_gate=True needs an input gate, but coupled=True has none: "
            "choose one of coupled and cap_input_gate"
        )


class MogrifierLSTMCell(nn.Module):
    r"""A Mogrifier LSTM cell, a drop-in for :class:`torch.nn.LSTMCell`.

    .. math::
        x', h' &= \operatorname{Mogrifier}_r(x, h_{t-1}) \\
        i &= \sigma(W_{ii} x' + b_{ii} + W_{hi} h' + b_{hi}) \\
        f &= \sigma(W_{if} x' + b_{if} + W_{hf} h' + b_{hf}) \\
        g &= \tanh(W_{ig} x' + b_{ig} + W_{hg} h' + b_{hg}) \\
        o &= \sigma(W_{io} x' + b_{io} + W_{ho} h' + b_{ho}) \\
        c_t &= f \odot c_{t-1} + i \odot g \\
        h_t &= o \odot \tanh(c_t)

    The gated :math:`h'` feeds only the gates; the state carried to the next step
    is the ordinary :math:`(h_t, c_t)`. See :class:`Mogrifier` for the rounds.

    Args:
        input_size: features of the input ``x``.
        hidden_size: features of the hidden state ``h``.
        bias: if ``False``, no ``bias_ih``/``bias_hh`` (the Mogrifier keeps its biases).
        mogrify_rounds: Mogrifier rounds ``r``; 0 gives a plain LSTM cell.
        mogrify_rank: rank of the round matrices, ``None`` for full rank.
        coupled: coupled input-forget gate, :math:`c_t = f \odot c_{t-1} + (1-f) \odot g`;
            there is no input gate, so ``weight_ih``/``weight_hh`` have ``3 * hidden_size``
            rows in the order ``(f, g, o)``.
        peephole: diagonal peephole weights ``weight_ci``, ``weight_cf`` (seeing
            :math:`c_{t-1}`) and ``weight_co`` (seeing :math:`c_t`), each ``(hidden_size,)``.
        cap_input_gate: :math:`c_t = f \odot c_{t-1} + \min(1 - f, i) \odot g`, as the
            official code does by default. Not with ``coupled``.

    Parameters are named and laid out as in :class:`torch.nn.LSTMCell`
    (``weight_ih`` ``(4H, I)``, ``weight_hh`` ``(4H, H)``, ``bias_ih``, ``bias_hh``;
    gates ``i, f, g, o``), so a ``torch.nn.LSTMCell`` state dict loads directly
    (with ``strict=False`` when the cell also has Mogrifier or peephole
    parameters). The Mogrifier's parameters live under ``mogrifier.``.

    Shape:
        - input: ``(B, I)`` or ``(I,)``.
        - hx: ``None`` (zeros) or ``(h_0, c_0)``, each ``(B, H)``, or ``(H,)`` when
          the input is unbatched.
        - Output: ``(h_1, c_1)``, each ``(B, H)`` or ``(H,)``.

    Example::

        >>> cell = MogrifierLSTMCell(10, 20, mogrify_rounds=5, mogrify_rank=4)
        >>> x = torch.randn(6, 3, 10)
        >>> h, c = cell(x[0])
        >>> for t in range(1, 6):
        ...     h, c = cell(x[t], (h, c))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        mogrify_rounds: int = 5,
        mogrify_rank: int | None = None,
        coupled: bool = False,
        peephole: bool = False,
        cap_input_gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_variants(coupled, cap_input_gate)
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.coupled = bool(coupled)
        self.peephole = bool(peephole)
        self.cap_input_gate = bool(cap_input_gate)
        check_rounds("mogrify_rounds", mogrify_rounds)
        check_rank("mogrify_rank", mogrify_rank, input_size, hidden_size)
        self.mogrifier = Mogrifier(
            input_size, hidden_size, mogrify_rounds, mogrify_rank, device=device, dtype=dtype
        )
        shapes = lstm_parameter_shapes(input_size, hidden_size, bias, coupled, peephole)
        for name, shape in shapes.items():
            self.register_parameter(
                name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
            )
        if not bias:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @property
    def mogrify_rounds(self) -> int:
        return self.mogrifier.rounds

    @property
    def mogrify_rank(self) -> int | None:
        return self.mogrifier.rank

    def reset_parameters(self) -> None:
        """torch's LSTM scheme, U(-1/sqrt(H), 1/sqrt(H)), here and for peepholes; the
        Mogrifier resets itself (see :class:`Mogrifier`)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters(recurse=False):
            nn.init.uniform_(p, -bound, bound)
        self.mogrifier.reset_parameters()

    def variants(self) -> dict:
        """Keyword options for :func:`moglstm.nn.functional.lstm_cell`."""
        peephole = None
        if self.peephole:
            peephole = (getattr(self, "weight_ci", None), self.weight_cf, self.weight_co)
        return {
            "peephole": peephole,
            "coupled": self.coupled,
            "cap_input_gate": self.cap_input_gate,
        }

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        h, c, unbatched = self._prepare(input, hx)
        x = input.unsqueeze(0) if unbatched else input
        h, c = mf.mogrifier_lstm_cell(
            x,
            h,
            c,
            self.mogrifier.round_weights(),
            self.mogrifier.round_biases(),
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
            **self.variants(),
        )
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)

    def _prepare(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, Tensor, bool]:
        """Check the input and state; return batched ``(h, c)`` and whether unbatched."""
        check_tensor("input", input)
        check_floating("input", input)
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input must have shape (B, {self.input_size}) or ({self.input_size},), "
                f"got {tuple(input.shape)}"
            )
        check_like("input", input, self.weight_ih, "weight_ih")
        unbatched = input.dim() == 1
        batch = () if unbatched else (input.shape[0],)
        if hx is None:
            zeros = input.new_zeros((*batch, self.hidden_size))
            h, c = zeros, zeros
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx must be None or a pair (h, c), got {type(hx).__name__}")
            h, c = hx
            for name, v in (("hx[0]", h), ("hx[1]", c)):
                check_tensor(name, v)
                check_shape(name, v, (*batch, self.hidden_size))
                check_like(name, v, input, "input")
        if unbatched:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        return h, c, unbatched

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for flag in ("coupled", "peephole", "cap_input_gate"):
            if getattr(self, flag):
                s += f", {flag}=True"
        if not self.bias:
            s += ", bias=False"
        return s
