"""The reference backend: :mod:`moglstm.nn.functional` step by step, recorded by autograd.

The definition every other backend is tested against; the only one for packed sequences,
dtypes the fused backends do not take, and ``proj_size``; the fused backends' second
derivatives recompute with it (:mod:`moglstm.nn.backends.recompute`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moglstm.nn import functional as mf  # moglstm's; "F" is always torch's
from moglstm.nn.backends.base import Backend
from moglstm.nn.direction import Direction, Steps


def step(
    d: Direction,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    mask: Tensor | None,
    gates_x: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of direction ``d``: the Mogrifier rounds on ``x`` and the (masked) ``h``,
    then the cell; ``gates_x``, if given, is ``x``'s projection with ``bias_ih``."""
    h_in = h if mask is None else h * mask
    x, h_in = mf.mogrify(x, h_in, d.round_weights(), d.round_biases())
    bias_ih = d.bias_ih if gates_x is None else None
    return mf.lstm_cell(
        x,
        h_in,
        c,
        d.weight_ih,
        d.weight_hh,
        bias_ih,
        d.bias_hh,
        gates_x=gates_x,
        weight_hr=d.weight_hr,
        **d.variants(),
    )


class Reference(Backend):
    name = "reference"

    def run(
        self,
        steps: Steps,
        h: Tensor,
        c: Tensor,
        d: Direction,
        reverse: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sequences shorter than the batch (packed) keep their state after their last
        step."""
        precompute = not d.rounds  # with no rounds, x is not gated: one big matmul
        gates_x = mf.round_linear(steps.x, d.weight_ih, d.bias_ih) if precompute else None
        if steps.batch_sizes is None:
            index = [(t, None) for t in range(steps.length)]
        else:
            index = [(slice(o, o + n), n) for o, n in steps.slices()]
        outputs: list[Tensor] = [None] * len(index)  # type: ignore[list-item]
        order = range(len(index) - 1, -1, -1) if reverse else range(len(index))
        for t in order:
            rows, n = index[t]
            x_t = steps.x[rows]
            h_t, c_t = (h, c) if n is None else (h[:n], c[:n])
            m_t = mask if mask is None or n is None else mask[:n]
            h_t, c_t = step(d, x_t, h_t, c_t, m_t, None if gates_x is None else gates_x[rows])
            outputs[t] = h_t
            if n is None or n == h.shape[0]:
                h, c = h_t, c_t
            else:  # rows past n have ended (forward) or not started (reverse): keep them
                h, c = torch.cat([h_t, h[n:]]), torch.cat([c_t, c[n:]])
        out = torch.stack(outputs) if steps.batch_sizes is None else torch.cat(outputs)
        return out, h, c
