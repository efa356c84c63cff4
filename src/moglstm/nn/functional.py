r"""Reference step functions of the Mogrifier LSTM.

These are the readable definitions that the modules use and that every fast path
is checked against. Shapes use ``B`` for the batch, ``I`` for the input size and
``H`` for the hidden size.

A Mogrifier round matrix is either a full ``Tensor`` of shape ``(out, in)`` or a
low-rank pair ``(left, right)`` of shapes ``(out, k)`` and ``(k, in)`` whose
product is the matrix. Odd rounds (1, 3, ...) map ``h`` to a gate on ``x``
(``out = I``, ``in = H``); even rounds map ``x`` to a gate on ``h``
(``out = H``, ``in = I``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RoundWeight = Tensor | tuple[Tensor, Tensor]

__all__ = ["RoundWeight", "mogrify", "lstm_cell", "mogrifier_lstm_cell", "round_linear"]


def round_linear(v: Tensor, weight: RoundWeight, bias: Tensor | None = None) -> Tensor:
    """``v @ W.T + bias`` for a full or low-rank (``W = left @ right``) round matrix.

    The low-rank product is never formed: ``(v @ right.T) @ left.T`` costs
    ``k * (in + out)`` per row instead of ``in * out``.
    """
    if isinstance(weight, tuple):
        left, right = weight
        out = torch.matmul(torch.matmul(v, right.t()), left.t())
        return out if bias is None else out + bias
    if bias is None:
        return torch.matmul(v, weight.t())
    return torch.addmm(bias, v, weight.t()) if v.dim() == 2 else torch.matmul(v, weight.t()) + bias


def mogrify(
    x: Tensor,
    h: Tensor,
    weights: Sequence[RoundWeight],
    biases: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Mutual gating of ``x`` and ``h`` (Melis et al., 2020, eq. 1-2).

    For round :math:`i = 1, \dots, r`:

    .. math::
        x &\leftarrow 2\,\sigma(Q^i h + b^i) \odot x \quad (i \text{ odd}) \\
        h &\leftarrow 2\,\sigma(R^i x + b^i) \odot h \quad (i \text{ even})

    always with the latest ``x`` and ``h``, so one round gates only ``x``.

    Args:
        x: ``(B, I)`` or ``(I,)``.
        h: ``(B, H)`` or ``(H,)``.
        weights: ``r`` round matrices, full ``(out, in)`` or low-rank ``(left, right)``.
        biases: ``r`` biases of shape ``(out,)`` or ``None`` entries; ``None`` for no biases.

    Returns:
        The gated ``(x, h)``, same shapes as the inputs.
    """
    if biases is None:
        biases = [None] * len(weights)
    for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        if i % 2 == 0:  # round i+1 is odd: h gates x
            x = 2 * torch.sigmoid(round_linear(h, weight, bias)) * x
        else:  # even round: x gates h
            h = 2 * torch.sigmoid(round_linear(x, weight, bias)) * h
    return x, h


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    *,
    peephole: tuple[Tensor | None, Tensor, Tensor] | None = None,
    coupled: bool = False,
    cap_input_gate: bool = False,
    gates_x: Tensor | None = None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One LSTM step with torch's gate order ``(i, f, g, o)`` and the variants.

    .. math::
        i &= \sigma(W_{ii} x + b_{ii} + W_{hi} h + b_{hi} + p_i \odot c) \\
        f &= \sigma(W_{if} x + b_{if} + W_{hf} h + b_{hf} + p_f \odot c) \\
        g &= \tanh(W_{ig} x + b_{ig} + W_{hg} h + b_{hg}) \\
        c' &= f \odot c + i \odot g \\
        o &= \sigma(W_{io} x + b_{io} + W_{ho} h + b_{ho} + p_o \odot c') \\
        h' &= o \odot \tanh(c')

    ``coupled`` drops the input gate (weights are ``(f, g, o)``, ``3H`` rows) and
    uses :math:`c' = f \odot c + (1 - f) \odot g`; ``cap_input_gate`` uses
    :math:`c' = f \odot c + \min(1 - f, i) \odot g`; the peephole terms
    :math:`p_\ast` are present only when ``peephole = (p_i, p_f, p_o)`` is given
    (``p_i`` is ``None`` when coupled). With ``weight_hr`` (``(P, H)``, torch's
    ``proj_size``) the output is projected, :math:`h' = W_{hr} (o \odot \tanh(c'))`,
    and ``h`` and ``weight_hh`` have ``P`` columns.

    Args:
        x: ``(B, I)``; h, c: ``(B, H)``.
        weight_ih: ``(G*H, I)``, weight_hh: ``(G*H, H)``, biases ``(G*H,)``,
            with ``G = 3`` when coupled, else 4.
        gates_x: precomputed ``x @ weight_ih.T + bias_ih``; then ``x`` is unused.
        weight_hr: the projection ``(P, H)``, or ``None``.

    Returns:
        ``(h', c')``: ``(B, H)`` each, or ``(B, P)`` and ``(B, H)`` with a projection.
    """
    if gates_x is None:
        gates_x = round_linear(x, weight_ih, bias_ih)
    gates = gates_x + round_linear(h, weight_hh, bias_hh)
    if coupled:
        f, g, o = gates.chunk(3, -1)
        i = None
    else:
        i, f, g, o = gates.chunk(4, -1)
    if peephole is not None:
        p_i, p_f, p_o = peephole
        f = f + p_f * c
        if i is not None:
            i = i + p_i * c
    f = torch.sigmoid(f)
    g = torch.tanh(g)
    if coupled:
        c_new = f * c + (1 - f) * g
    elif cap_input_gate:
        c_new = f * c + torch.minimum(1 - f, torch.sigmoid(i)) * g
    else:
        c_new = f * c + torch.sigmoid(i) * g
    if peephole is not None:
        o = o + peephole[2] * c_new
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    if weight_hr is not None:
        h_new = torch.matmul(h_new, weight_hr.t())
    return h_new, c_new


def mogrifier_lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    mogrifier_weights: Sequence[RoundWeight],
    mogrifier_biases: Sequence[Tensor | None] | None,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    **variants,
) -> tuple[Tensor, Tensor]:
    """One Mogrifier LSTM step: :func:`mogrify` then :func:`lstm_cell`.

    The gated ``h`` feeds only the gates; the carried cell state ``c`` is not
    gated, and the returned state is the ordinary ``(h', c')``. ``variants`` are
    the keyword options of :func:`lstm_cell`.
    """
    x, h_gated = mogrify(x, h, mogrifier_weights, mogrifier_biases)
    return lstm_cell(x, h_gated, c, weight_ih, weight_hh, bias_ih, bias_hh, **variants)
