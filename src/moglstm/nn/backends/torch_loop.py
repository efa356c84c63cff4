"""The torch-ops step loop: a Python loop over the window's steps, run with torch ops.

It runs anywhere torch does (CUDA, float64, no compiler) and is the readable description
of what the compiled loop (:mod:`moglstm.nn.backends.compiled`) and the Triton kernels
do. :class:`TorchLoopKernels` is the same loop with the pointwise parts of a step (a
round's gating, the LSTM cell update, and their backward) done by the C kernels of
:mod:`moglstm.nn._kernels` in one pass each: the only difference is its four
pointwise methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from moglstm.nn import _kernels
from moglstm.nn.backends.base import FusedBackend, Saved
from moglstm.nn.backends.buffers import (
    Buffers,
    arena_shape,
    fresh_grad,
    round_slots,
    rows,
    split_gates,
    start_window,
    weight_grads,
)
from moglstm.nn.direction import Direction, DirectionSpec


def packable(weight: Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class StepLinear:
    """``x @ weight.T + bias``, applied at every step with the same weight.

    On CPU in float32 the weight is packed once per call for MKL's small-batch
    GEMM (the packing torch.compile's CPU freezing uses for linear layers): the
    per-step products, only ``B`` rows each, then run about 1.3x faster than with
    ``addmm``. Elsewhere (float64, CUDA) it is ``addmm``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, batch: int = 1) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.packed = None
        if packable(weight):
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, batch)

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        if self.packed is not None:
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
            return y if out is None else out.copy_(y)
        if self.bias is None:
            return torch.mm(x, self.weight.t(), out=out)
        return torch.addmm(self.bias, x, self.weight.t(), out=out)


def gates_weight(d: Direction) -> Tensor:
    """The gates' weight applied per step: ``[W_ih W_hh]`` (G, I + H) with rounds (x is
    gated per step), ``W_hh`` without (the x projection is done for all steps at once)."""
    return torch.cat([d.weight_ih, d.weight_hh], 1) if d.rounds else d.weight_hh


@dataclass
class StepOps:
    """The per-step products of one direction: forward or backward ones."""

    round_in: list[StepLinear | None]  # low-rank: v -> u (forward) or du -> dv (backward)
    round_out: list[StepLinear]  # u or v -> z (forward), or dz -> du or dv (backward)
    gates: StepLinear | None  # [x_m, h_m] -> gates (forward) or dgates -> d[x_m, h_m]

    @staticmethod
    def forward(d: Direction, batch: int) -> StepOps:
        return StepOps(
            round_in=[
                None if r.right is None else StepLinear(r.right, None, batch) for r in d.rounds
            ],
            round_out=StepOps.round_outputs(d, batch),
            gates=StepLinear(gates_weight(d), d.gates_bias if d.rounds else None, batch),
        )

    @staticmethod
    def round_outputs(d: Direction, batch: int) -> list[StepLinear]:
        """Each round's ``u`` (or ``v``) -> pre-activation ``z`` product, with its bias."""
        return [StepLinear(r.left, r.bias, batch) for r in d.rounds]

    @staticmethod
    def backward(d: Direction, batch: int) -> StepOps:
        return StepOps(
            round_in=[
                None if r.right is None else StepLinear(r.right.t(), None, batch) for r in d.rounds
            ],
            round_out=[StepLinear(r.left.t(), None, batch) for r in d.rounds],
            gates=StepLinear(gates_weight(d).t(), None, batch),
        )


@contextmanager
def one_thread(active: bool) -> Iterator[None]:
    """Run the small per-step products of the rounds on one CPU thread.

    A ``(B, k)`` by ``(k, n)`` product gains nothing from a second thread on CPU,
    and when the cores are shared with other processes a multi-threaded one can
    stall for a whole scheduler slice waiting for its partner thread (measured
    here: 2.5 ms instead of 0.13 ms). The gates' product, large enough to share,
    keeps every thread. Setting the thread count costs well under a microsecond.
    """
    previous = torch.get_num_threads()
    if not active or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def store_state(dest: Tensor, h: Tensor, mask: Tensor | None) -> None:
    """The h fed into a step: ``h * mask`` under state dropout."""
    if mask is None:
        dest.copy_(h)
    else:
        torch.mul(h, mask, out=dest)


class RoundGrads:
    """Weight gradients of the rounds, accumulated over chunks of steps.

    Backward writes each step's ``dz`` (and low-rank ``du``) into a buffer of
    ``chunk`` steps; every full chunk is turned into gradients by a product over
    ``chunk * B`` rows (about ``CHUNK_ROWS``), large enough to run at full speed,
    without keeping a ``(T, B, .)`` gradient buffer per round.
    """

    CHUNK_ROWS = 1024

    def __init__(
        self, spec: DirectionSpec, buf: Buffers, batch: int, chunk: int | None = None
    ) -> None:
        """``chunk``: steps per flush (default: about ``CHUNK_ROWS`` rows)."""
        T = buf.gates.shape[0]
        self.spec, self.buf = spec, buf
        self.chunk = max(1, min(T, chunk or -(-self.CHUNK_ROWS // batch)))
        new = buf.gates.new_empty
        widths = [spec.round_shape(r)[0] for r in range(spec.rounds)]
        self.dz = [new(self.chunk, batch, n) for n in widths]
        self.du = [new(self.chunk, batch, u.shape[-1]) for u in buf.u]
        self.grads: list[list[Tensor]] = [[] for _ in range(spec.rounds)]

    def chunks(self, T: int) -> list[range]:
        """The backward order: chunks from the last, steps within from the last."""
        return [range(min(s + self.chunk, T) - 1, s - 1, -1) for s in range(0, T, self.chunk)][::-1]

    def flush(self, steps: range) -> None:
        """Add the gradients of the steps just done (``steps`` in backward order)."""
        start, end = steps[-1], steps[0] + 1
        n = end - start
        for r, (_tgt, src) in enumerate(round_slots(self.spec.rounds)):
            v = rows((self.buf.hs[src] if r % 2 == 0 else self.buf.xs[src])[start:end])
            dz = rows(self.dz[r][:n])
            if self.spec.low_rank:
                parts = [dz.t() @ rows(self.buf.u[r][start:end]), rows(self.du[r][:n]).t() @ v]
            else:
                parts = [dz.t() @ v]
            if self.spec.round_bias:
                parts.append(dz.sum(0))
            acc = self.grads[r]
            self.grads[r] = (
                parts if not acc else [a.add_(b) for a, b in zip(acc, parts, strict=True)]
            )


class TorchLoop(FusedBackend):
    """The step loop in Python, every op a torch op."""

    name = "torch-loop"

    # -- the pointwise parts of a step (overridden by TorchLoopKernels)

    def round_forward(self, s: Tensor, old: Tensor, new: Tensor) -> None:
        """In place: ``s = sigmoid(s)``, ``new = 2 * s * old``."""
        s.sigmoid_()
        torch.mul(s, old, out=new).mul_(2)

    def round_backward(self, z: Tensor, old: Tensor, d_new: Tensor, d_old: Tensor) -> None:
        """In place, with ``s = sigmoid(z)``: ``d_old = 2 s d_new``; ``z`` becomes
        ``dz = 2 old d_new s (1 - s)``."""
        s = z.sigmoid_()
        torch.mul(s, d_new, out=d_old).mul_(2)
        s.mul_(1 - s).mul_(d_new).mul_(old).mul_(2)

    def lstm_forward(
        self, spec: DirectionSpec, d: Direction, buf: Buffers, t: int, out: Tensor
    ) -> None:
        """Activate ``buf.gates[t]`` in place, update the cell; writes ``h_t`` into ``out``."""
        i, f, g, o = split_gates(spec, buf.gates[t])
        c_prev, c = buf.c[t], buf.c[t + 1]
        if d.peephole is not None:
            f.addcmul_(d.peephole[1], c_prev)
            if i is not None:
                i.addcmul_(d.peephole[0], c_prev)
        f.sigmoid_()
        g.tanh_()
        torch.mul(f, c_prev, out=c)
        if spec.coupled:
            c.addcmul_(1 - f, g)
        else:
            i.sigmoid_()
            c.addcmul_(torch.minimum(1 - f, i) if spec.cap_input_gate else i, g)
        if d.peephole is not None:
            o.addcmul_(d.peephole[2], c)
        o.sigmoid_()
        torch.mul(o, torch.tanh(c), out=out)

    def lstm_backward(
        self, spec: DirectionSpec, d: Direction, buf: Buffers, t: int, dh: Tensor, dc: Tensor
    ) -> Tensor:
        """Gradients of step ``t``'s cell update: overwrites ``buf.gates[t]`` with the
        pre-activation gate gradients; returns ``dc_{t-1}``."""
        gates = buf.gates[t]
        i, f, g, o = split_gates(spec, gates)
        c_prev, tanh_c = buf.c[t], torch.tanh(buf.c[t + 1])
        dc.addcmul_(dh * o, 1 - tanh_c * tanh_c)
        dz_o = dh * tanh_c * o * (1 - o)
        if d.peephole is not None:
            dc.addcmul_(dz_o, d.peephole[2])
        if spec.coupled:
            dz_i = None
            df = dc * (c_prev - g)
            dg = dc * (1 - f)
        elif spec.cap_input_gate:
            one_minus_f = 1 - f
            # d min(a, b): to the smaller one, split evenly on ties (as torch.minimum does)
            to_a = (one_minus_f < i).to(dc.dtype) + 0.5 * (one_minus_f == i).to(dc.dtype)
            dm = dc * g
            df = dc * c_prev - dm * to_a
            dz_i = dm * (1 - to_a) * i * (1 - i)
            dg = dc * torch.minimum(one_minus_f, i)
        else:
            df = dc * c_prev
            dz_i = dc * g * i * (1 - i)
            dg = dc * i
        dz_f = df * f * (1 - f)
        dz_g = dg * (1 - g * g)
        dc_prev = dc * f
        if d.peephole is not None:
            dc_prev.addcmul_(dz_f, d.peephole[1])
            if dz_i is not None:
                dc_prev.addcmul_(dz_i, d.peephole[0])
        di, dfv, dgv, dov = split_gates(spec, gates)
        if di is not None:
            di.copy_(dz_i)
        dfv.copy_(dz_f)
        dgv.copy_(dz_g)
        dov.copy_(dz_o)
        return dc_prev

    # -- forward

    def saved_shapes(self, spec: DirectionSpec, x: Tensor) -> list[tuple[int, ...]]:
        return [arena_shape(spec, x)]

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
        ops = StepOps.forward(d, B)
        scratch = (x.new_empty(B, spec.input_size), x.new_empty(B, spec.hidden_size))
        h = h0
        if spec.rounds == 0:  # x is never gated: project all steps at once
            gates_x = torch.matmul(x, d.weight_ih.t())
            if d.gates_bias is not None:
                gates_x += d.gates_bias
            for t in range(T):
                store_state(buf.hs[0][t], h, mask)
                torch.add(gates_x[t], ops.gates(buf.hs[0][t]), out=buf.gates[t])
                self.lstm_forward(spec, d, buf, t, out[t])
                h = out[t]
        else:
            for t in range(T):
                with one_thread(x.device.type == "cpu"):
                    self.forward_rounds(spec, buf, t, h, mask, ops, scratch)
                ops.gates(buf.xh[t], out=buf.gates[t])
                self.lstm_forward(spec, d, buf, t, out[t])
                h = out[t]
        return out, out[-1].clone(), buf.c[-1].clone(), (buf.arena,)

    def forward_rounds(
        self,
        spec: DirectionSpec,
        buf: Buffers,
        t: int,
        h: Tensor,
        mask: Tensor | None,
        ops: StepOps,
        scratch: tuple[Tensor, Tensor],
    ) -> None:
        """Step ``t``'s Mogrifier rounds: writes every version of x and h into the buffers."""
        xs, hs = buf.xs, buf.hs
        store_state(hs[0][t], h, mask)
        for r, (tgt, src) in enumerate(round_slots(spec.rounds)):
            odd = r % 2 == 0  # rounds count from 1: r = 0 is round 1
            v = hs[src][t] if odd else xs[src][t]
            old = xs[tgt][t] if odd else hs[tgt][t]
            new = xs[tgt + 1][t] if odd else hs[tgt + 1][t]
            s = scratch[0 if odd else 1]
            if spec.low_rank:
                v = ops.round_in[r](v, out=buf.u[r][t])
            ops.round_out[r](v, out=s)
            self.round_forward(s, old, new)

    # -- backward

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
        d = Direction.from_flat(spec, flat)
        buf = Buffers(spec, x, *saved)
        T, B, I = x.shape
        dh, dc = fresh_grad(d_hn, buf.c[0]), fresh_grad(d_cn, buf.c[0])
        dx_all = torch.empty_like(x) if spec.rounds else None
        back = StepOps.backward(d, B)
        recompute = StepOps.round_outputs(d, B)  # the rounds' forward products, not the gates
        rg = RoundGrads(spec, buf, B)
        for steps in rg.chunks(T):
            for t in steps:
                if d_out is not None:
                    dh = dh + d_out[t]
                dc = self.lstm_backward(spec, d, buf, t, dh, dc)
                dxh = back.gates(buf.gates[t])  # (B, I + H): d x_m and d h_m at once, or d h_m
                if spec.rounds:
                    slot = t - steps[-1]
                    with one_thread(x.device.type == "cpu"):
                        dx, dh_m = dxh[:, :I], dxh[:, I:]
                        dh = self.rounds_backward(
                            spec, buf, t, slot, dx, dh_m, recompute, back, rg, dx_all[t]
                        )
                else:
                    dh = dxh
                if mask is not None:
                    dh = dh * mask
            rg.flush(steps)
        if dx_all is None:  # no rounds: the input's gradient in one product
            dx_all = buf.gates @ d.weight_ih
        return dx_all, dh, dc, weight_grads(spec, buf, rg.grads, None)

    def rounds_backward(
        self,
        spec: DirectionSpec,
        buf: Buffers,
        t: int,
        slot: int,
        dx: Tensor,
        dh: Tensor,
        recompute: list[StepLinear],
        back: StepOps,
        rg: RoundGrads,
        dx_out: Tensor,
    ) -> Tensor:
        """Back through the rounds of step ``t``: recomputes each round's gate, writes the
        input's gradient into ``dx_out``, ``dz`` (and ``du``) of each round into ``rg`` at
        ``slot``, and returns the gradient of the h fed in."""
        for r, (tgt, src) in reversed(list(enumerate(round_slots(spec.rounds)))):
            odd = r % 2 == 0
            d_new = dx if odd else dh
            old = buf.xs[tgt][t] if odd else buf.hs[tgt][t]
            v = buf.u[r][t] if spec.low_rank else (buf.hs[src][t] if odd else buf.xs[src][t])
            z = recompute[r](v, out=rg.dz[r][slot])  # the round's pre-activation, again
            d_old = dx_out if r == 0 else torch.empty_like(z)  # round 1 yields d input
            self.round_backward(z, old, d_new, d_old)
            dz = z
            if spec.low_rank:
                dv = back.round_in[r](back.round_out[r](dz, out=rg.du[r][slot]))
            else:
                dv = back.round_out[r](dz)
            if odd:  # dh and dx are fresh tensors or views of one: accumulate in place
                dx, dh = d_old, dh.add_(dv)
            else:
                dx, dh = dx.add_(dv), d_old
        return dh


class TorchLoopKernels(TorchLoop):
    """:class:`TorchLoop` with the pointwise parts in C (CPU, float32/float64)."""

    name = "torch-loop+c-kernels"

    def round_forward(self, s: Tensor, old: Tensor, new: Tensor) -> None:
        _kernels.round_forward(s, old, new)

    def round_backward(self, z: Tensor, old: Tensor, d_new: Tensor, d_old: Tensor) -> None:
        _kernels.round_backward(z, old, d_new, d_old)

    def lstm_forward(
        self, spec: DirectionSpec, d: Direction, buf: Buffers, t: int, out: Tensor
    ) -> None:
        _kernels.lstm_forward(
            buf.gates[t], buf.c[t], buf.c[t + 1], out, d.peephole, spec.coupled, spec.cap_input_gate
        )

    def lstm_backward(
        self, spec: DirectionSpec, d: Direction, buf: Buffers, t: int, dh: Tensor, dc: Tensor
    ) -> Tensor:
        dc = dc.contiguous()
        _kernels.lstm_backward(
            buf.gates[t],
            buf.c[t],
            buf.c[t + 1],
            dh.contiguous(),
            dc,
            d.peephole,
            spec.coupled,
            spec.cap_input_gate,
        )
        return dc
