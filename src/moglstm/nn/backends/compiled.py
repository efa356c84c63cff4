"""The compiled CPU loop: every step of the window in C (``csrc/body.h``) on several threads.

The rounds run on each thread's batch rows, the gates on its hidden units; each thread
also accumulates the rounds' weight gradients for its rows. The matrix products go to
torch's own BLAS (MKL on x86), found and checked by :mod:`moglstm.nn._kernels`, which
also builds the library and checks the ``Layer`` struct against the C side's layout.
The buffers and the weight gradients after the loop are the torch-ops loop's
(:mod:`moglstm.nn.backends.buffers`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from moglstm.nn import _kernels
from moglstm.nn.backends.base import FusedBackend, Saved
from moglstm.nn.backends.buffers import (
    Buffers,
    arena_shape,
    fresh_grad,
    rows,
    start_window,
    weight_grads,
)
from moglstm.nn.backends.torch_loop import gates_weight
from moglstm.nn.direction import Direction, DirectionSpec


def compiled_layer(
    spec: DirectionSpec,
    d: Direction,
    buf: Buffers,
    w_gates: Tensor,
    out: Tensor | None,
    h0: Tensor | None,
    mask: Tensor | None,
    gradients: dict[str, Tensor | None] | None = None,
    accumulators: dict[str, list] | None = None,
) -> _kernels.Layer:
    """The :class:`moglstm.nn._kernels.Layer` the compiled step loop runs on; backward also
    hands in its gradient tensors and the per-thread weight-gradient accumulators."""
    T, B = buf.gates.shape[:2]
    peep = d.peephole if d.peephole is not None else (None, None, None)
    tensors = {
        "w_gates": w_gates,
        "bias": d.gates_bias,
        **dict(zip(("peep_i", "peep_f", "peep_o"), peep, strict=True)),
        "gates": buf.gates,
        "c": buf.c,
        "out": out,
        "h0": h0,
        "mask": None if mask is None else mask.contiguous(),
        **(gradients or {}),
    }
    lists = {
        "w_left": [r.left.contiguous() for r in d.rounds],
        "w_right": [r.right.contiguous() for r in d.rounds] if spec.low_rank else [],
        "w_bias": d.round_biases(),
        "xs": buf.xs,
        "hs": buf.hs,
        "u": buf.u,
        **(accumulators or {}),
    }
    flags = {
        "steps": T,
        "B": B,
        "I": spec.input_size,
        "H": spec.hidden_size,
        "G": spec.gate_rows,
        "rounds": spec.rounds,
        "low_rank": int(spec.low_rank),
        "coupled": int(spec.coupled),
        "cap": int(spec.cap_input_gate),
    }
    return _kernels.Layer.make(tensors, flags, lists)


class CompiledLoop(FusedBackend):
    """The C step loop (CPU, float32/float64, a C compiler and torch's BLAS found)."""

    name = "compiled-loop"

    def saved_shapes(self, spec: DirectionSpec, x: Tensor) -> list[tuple[int, ...]]:
        gates_in = spec.input_size + spec.hidden_size if spec.rounds else spec.hidden_size
        return [arena_shape(spec, x), (spec.gate_rows, gates_in)]  # the arena, [W_ih W_hh]

    def forward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, Tensor, Saved]:
        d = Direction.from_flat(spec, flat)
        buf, out = start_window(spec, x, c0)
        T, B, _ = x.shape
        w_gates = gates_weight(d).contiguous()  # kept for backward
        if spec.rounds == 0:  # x is never gated: project all steps at once, straight into gates
            torch.mm(rows(x), d.weight_ih.t(), out=rows(buf.gates))
            if d.gates_bias is not None:
                buf.gates += d.gates_bias
        layer = compiled_layer(spec, d, buf, w_gates, out, h0.contiguous(), mask)
        _kernels.run_rows("mog_forward", layer, x.dtype, _kernels.row_slices(B))
        return out, out[-1].clone(), buf.c[-1].clone(), (buf.arena, w_gates)

    def backward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
        saved: Saved,
        d_out: Tensor | None,
        d_hn: Tensor | None,
        d_cn: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Each thread adds the weight gradients of its rows into its own slice of the
        accumulators; the slices are summed here."""
        d = Direction.from_flat(spec, flat)
        arena, w_gates = saved
        buf = Buffers(spec, x, arena)
        T, B, _ = x.shape
        dh, dc = fresh_grad(d_hn, buf.c[0]), fresh_grad(d_cn, buf.c[0])
        slices = _kernels.row_slices(B)
        zeros = functools.partial(buf.gates.new_zeros, len(slices))
        acc = {
            "gw_left": [zeros(*r.left.shape) for r in d.rounds],
            "gw_right": [zeros(*r.right.shape) for r in d.rounds] if spec.low_rank else [],
            "gw_bias": [None if r.bias is None else zeros(*r.bias.shape) for r in d.rounds],
        }
        gates_bias = zeros(spec.gate_rows) if spec.bias else None
        dx_all = torch.empty_like(x) if spec.rounds else None
        gradients = {
            "d_out": None if d_out is None else d_out.contiguous(),
            "dh": dh,
            "dc": dc,
            "dx": dx_all,
            "g_bias": gates_bias,
            "work": buf.gates.new_empty(B, buf.xh.shape[-1]) if spec.rounds else None,
        }
        layer = compiled_layer(spec, d, buf, w_gates, None, None, mask, gradients, acc)
        _kernels.run_rows("mog_backward", layer, x.dtype, slices, T, 0)
        right = acc["gw_right"] or [None] * spec.rounds
        per_round = zip(acc["gw_left"], right, acc["gw_bias"], strict=True)
        round_grads = [[g.sum(0) for g in parts if g is not None] for parts in per_round]
        if dx_all is None:  # no rounds: the input's gradient in one product
            dx_all = buf.gates @ d.weight_ih
        db = None if gates_bias is None else gates_bias.sum(0)
        return dx_all, dh, dc, weight_grads(spec, buf, round_grads, db)
