"""The Mogrifier: mutual gating of an input and a hidden state, usable before any cell."""

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


class Mogrifier(nn.Module):
    r"""Mutual gating of ``x`` and ``h`` from "Mogrifier LSTM" (Melis et al., 2020).

    For round :math:`i = 1, \dots, r`, always with the latest ``x`` and ``h``:

    .. math::
        x &\leftarrow 2\,\sigma(Q^i h + b^i) \odot x \quad (i \text{ odd}) \\
        h &\leftarrow 2\,\sigma(R^i x + b^i) \odot h \quad (i \text{ even})

    Every round has its own matrix and bias. With ``rank=k`` each matrix is a
    product ``left @ right`` of an ``(out, k)`` and a ``(k, in)`` factor.

    Args:
        input_size: features of ``x`` (``I``).
        hidden_size: features of ``h`` (``H``).
        rounds: number of rounds ``r >= 0``; 0 is the identity.
        rank: ``None`` for full matrices, else ``1 <= rank < min(I, H)``.
        bias: if ``False``, rounds have no bias.

    Parameters (round ``i`` from 1): ``weight_i`` of shape ``(I, H)`` for odd and
    ``(H, I)`` for even rounds, or ``weight_i_left`` ``(out, k)`` and
    ``weight_i_right`` ``(k, in)`` when low-rank; ``bias_i`` of shape ``(out,)``.

    Initialisation: the gate at round ``i`` is ``2*sigmoid(z)`` with
    ``z = W v + b``; biases start at 0 so ``z = 0`` (the identity) for ``v = 0``,
    and matrices start with entries of variance ``1/in`` (``in`` the fan-in):
    full matrices from :math:`\mathcal{N}(0, 1/\text{in})`; low-rank factors
    ``right`` from :math:`\mathcal{N}(0, 1/\text{in})` and ``left`` from
    :math:`\mathcal{N}(0, 1/k)`, so each entry of the product has variance
    ``k * (1/k) * (1/in) = 1/in``. Hence ``z`` has about the variance of one
    entry of ``v`` and the gate is ``1 + z/2 + O(z^3)``: close to the identity
    for small inputs, without being degenerate.

    Shape:
        - x: ``(*, I)``, any leading dimensions (``(B, I)``, ``(I,)``, a sequence
          ``(B, N, I)``...); h: ``(*, H)`` with the same leading dimensions (one ``h``
          per row: never broadcast).
        - Output: ``(x', h')`` with the shapes of ``(x, h)``.

    Example::

        >>> mog = Mogrifier(input_size=10, hidden_size=20, rounds=5, rank=4)
        >>> cell = torch.nn.GRUCell(10, 20)
        >>> x, h = torch.randn(3, 10), torch.zeros(3, 20)
        >>> xm, hm = mog(x, h)
        >>> h = cell(xm, hm)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        rounds: int,
        rank: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.rounds = check_rounds("rounds", rounds)
        self.rank = check_rank("rank", rank, input_size, hidden_size)
        self.bias = bool(bias)
        factory = {"device": device, "dtype": dtype}
        for i in range(1, rounds + 1):
            out_f, in_f = self.round_shape(i)
            if self.rank is None:
                self.register_parameter(
                    f"weight_{i}", nn.Parameter(torch.empty(out_f, in_f, **factory))
                )
            else:
                left = nn.Parameter(torch.empty(out_f, self.rank, **factory))
                right = nn.Parameter(torch.empty(self.rank, in_f, **factory))
                self.register_parameter(f"weight_{i}_left", left)
                self.register_parameter(f"weight_{i}_right", right)
            self.register_parameter(
                f"bias_{i}", nn.Parameter(torch.empty(out_f, **factory)) if self.bias else None
            )
        self.reset_parameters()

    def round_shape(self, i: int) -> tuple[int, int]:
        """``(out, in)`` of round ``i`` (from 1): odd rounds map h to x, even x to h."""
        return (self.input_size, self.hidden_size) if i % 2 else (self.hidden_size, self.input_size)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for i in range(1, self.rounds + 1):
                _, in_f = self.round_shape(i)
                if self.rank is None:
                    getattr(self, f"weight_{i}").normal_(0.0, 1.0 / math.sqrt(in_f))
                else:
                    getattr(self, f"weight_{i}_left").normal_(0.0, 1.0 / math.sqrt(self.rank))
                    getattr(self, f"weight_{i}_right").normal_(0.0, 1.0 / math.sqrt(in_f))
                if self.bias:
                    getattr(self, f"bias_{i}").zero_()

    def round_weights(self) -> list[mf.RoundWeight]:
        """The round matrices in order, full tensors or ``(left, right)`` pairs."""
        if self.rank is None:
            return [getattr(self, f"weight_{i}") for i in range(1, self.rounds + 1)]
        return [
            (getattr(self, f"weight_{i}_left"), getattr(self, f"weight_{i}_right"))
            for i in range(1, self.rounds + 1)
        ]

    def round_biases(self) -> list[Tensor | None]:
        return [getattr(self, f"bias_{i}") for i in range(1, self.rounds + 1)]

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        self.check_inputs(x, h)
        return mf.mogrify(x, h, self.round_weights(), self.round_biases())

    def check_inputs(self, x: Tensor, h: Tensor) -> None:
        check_tensor("x", x)
        check_tensor("h", h)
        check_floating("x", x)
        if x.dim() == 0 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"x must have shape (*, {self.input_size}) (any leading dimensions), "
                f"got {tuple(x.shape)}"
            )
        check_shape("h", h, (*x.shape[:-1], self.hidden_size))
        check_like("h", h, x, "x")
        weight = next(self.parameters(), None)
        if weight is not None:
            check_like("x", x, weight, "the parameters")

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, rounds={self.rounds}"
        if self.rank is not None:
            s += f", rank={self.rank}"
        if not self.bias:
            s += ", bias=False"
        return s
