"""Fast path: one layer direction over a whole window as a single autograd node.

The reference path lets autograd record every small op of every step; its
backward then computes weight gradients step by step as thousands of small
matrix products. Here the forward loop keeps what backward needs in
preallocated ``(T, B, .)`` buffers, the backward loop runs only the chain
through ``h`` and ``c`` (and through the Mogrifier rounds), and all weight
gradients are computed after the loop as a few large products over ``T * B``
rows. The math is :mod:`moglstm.nn.functional`'s, and the tests check outputs
and gradients of every parameter against it.

Two step loops run this plan. On CPU, when :mod:`moglstm.nn._kernels` could build
its C library and find torch's BLAS, the compiled loop (``csrc/body.h``) runs every
step of the window in C on several threads: the rounds on each thread's batch rows,
the gates on its hidden units; each thread also accumulates the rounds' weight
gradients for its rows. Elsewhere (CUDA, no
compiler) the Python loop below runs the same steps with torch ops, and is the
readable description of what the C does.

Buffers reuse: in backward, step ``t``'s gate activations are overwritten by
the gate gradients and each round's sigmoid output by that round's
pre-activation gradient, once they have been read.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moglstm.nn import _kernels
from moglstm.nn.recompute import differentiable_backward


@dataclass(frozen=True)
class LayerSpec:
    """The static shape of a layer direction: what the flat parameter list holds."""

    rounds: int
    low_rank: bool
    round_bias: bool
    bias: bool
    coupled: bool
    peephole: bool
    cap_input_gate: bool


@dataclass
class Params:
    rounds: list[tuple[Tensor, ...]]  # (W,) or (left, right) per round
    round_biases: list[Tensor | None]
    weight_ih: Tensor
    weight_hh: Tensor
    bias: Tensor | None  # bias_ih + bias_hh
    peephole: tuple[Tensor | None, Tensor, Tensor] | None


def flatten_params(spec: LayerSpec, w) -> list[Tensor]:
    """The flat tensor list the Function takes, from a :class:`LayerWeights`."""
    flat: list[Tensor] = []
    for weight, bias in zip(w.mogrifier_weights, w.mogrifier_biases, strict=True):
        flat.extend(weight if spec.low_rank else (weight,))
        if spec.round_bias:
            flat.append(bias)
    flat += [w.weight_ih, w.weight_hh]
    if spec.bias:
        flat += [w.bias_ih, w.bias_hh]
    if spec.peephole:
        p_i, p_f, p_o = w.variants["peephole"]
        flat += ([] if spec.coupled else [p_i]) + [p_f, p_o]
    return flat


def unflatten_params(spec: LayerSpec, flat: tuple[Tensor, ...]) -> Params:
    it = iter(flat)
    rounds, biases = [], []
    for _ in range(spec.rounds):
        rounds.append((next(it), next(it)) if spec.low_rank else (next(it),))
        biases.append(next(it) if spec.round_bias else None)
    weight_ih, weight_hh = next(it), next(it)
    bias = next(it) + next(it) if spec.bias else None
    peephole = None
    if spec.peephole:
        p_i = None if spec.coupled else next(it)
        peephole = (p_i, next(it), next(it))
    return Params(rounds, biases, weight_ih, weight_hh, bias, peephole)


def round_slots(rounds: int) -> list[tuple[int, int]]:
    """For each round, ``(version index of the gated vector before the round,
    version index of the gating vector)``; x versions change on odd rounds
    (index 0 of the list), h versions on even ones."""
    slots, xi, hi = [], 0, 0
    for r in range(rounds):
        if r % 2 == 0:
            slots.append((xi, hi))
            xi += 1
        else:
            slots.append((hi, xi))
            hi += 1
    return slots


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


@dataclass
class StepOps:
    """The per-step products of one direction: forward or backward ones."""

    round_in: list[StepLinear | None]  # low-rank: v -> u (forward) or du -> dv (backward)
    round_out: list[StepLinear]  # u or v -> z (forward), or dz -> du or dv (backward)
    gates: StepLinear  # [x_m, h_m] -> gates (forward) or dgates -> d[x_m, h_m] (backward)

    @staticmethod
    def forward(spec: LayerSpec, p: Params, batch: int) -> StepOps:
        low = spec.low_rank
        w_cat = torch.cat([p.weight_ih, p.weight_hh], 1) if spec.rounds else p.weight_hh
        return StepOps(
            round_in=[StepLinear(w[1], None, batch) if low else None for w in p.rounds],
            round_out=StepOps.round_outputs(p, batch),
            gates=StepLinear(w_cat, p.bias if spec.rounds else None, batch),
        )

    @staticmethod
    def round_outputs(p: Params, batch: int) -> list[StepLinear]:
        """Each round's ``u`` (or ``v``) -> pre-activation ``z`` product, with its bias."""
        return [StepLinear(w[0], b, batch) for w, b in zip(p.rounds, p.round_biases, strict=True)]

    @staticmethod
    def backward(spec: LayerSpec, p: Params, batch: int) -> StepOps:
        low = spec.low_rank
        w_cat = torch.cat([p.weight_ih, p.weight_hh], 1) if spec.rounds else p.weight_hh
        return StepOps(
            round_in=[StepLinear(w[1].t(), None, batch) if low else None for w in p.rounds],
            round_out=[StepLinear(w[0].t(), None, batch) for w in p.rounds],
            gates=StepLinear(w_cat.t(), None, batch),
        )


def carve(like: Tensor, shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, list[Tensor]]:
    """Tensors of the given shapes, carved out of one allocation (64-byte aligned views).

    A window's buffers are about 100 MB per layer at B=64, T=70, H=512; first-touching
    them in 4 KiB pages cost about 0.5 ms per MB here, so on CPU the block is advised
    to use transparent huge pages (a no-op where Linux or the machine says no).
    """
    align = 64 // like.element_size()
    sizes = {name: [math.prod(s) for s in group] for name, group in shapes.items()}
    total = sum(-(-n // align) * align for group in sizes.values() for n in group)
    arena = like.new_empty(total)
    if like.device.type == "cpu":
        _kernels.advise_huge_pages(arena)
    out, offset = {}, 0
    for name, group in shapes.items():
        out[name] = []
        for shape, n in zip(group, sizes[name], strict=True):
            out[name].append(arena[offset : offset + n].view(shape))
            offset += -(-n // align) * align
    return out


class Buffers:
    """Everything the forward keeps for backward, ``T`` steps of ``B`` rows.

    ``xs``/``hs`` list the versions of x and h that the rounds produce, each
    ``(T, B, .)``: ``xs[0]`` is the input itself, ``hs[0]`` the (masked) h_{t-1}.
    With rounds, the last versions are the two halves of one ``(T, B, I + H)``
    buffer ``xh``, so the gates take one matrix product per step.
    """

    def __init__(self, spec: LayerSpec, p: Params, x: Tensor, hidden: int) -> None:
        T, B, I = x.shape
        H = hidden
        nx, nh = (spec.rounds + 1) // 2 + 1, spec.rounds // 2 + 1
        ranks = [p.rounds[r][0].shape[1] for r in range(spec.rounds)] if spec.low_rank else []
        G = p.weight_hh.shape[0]
        shapes = {
            "xh": [(T, B, I + H)] if spec.rounds else [],
            "xs": [(T, B, I)] * (nx - 2) if spec.rounds else [],
            "hs": [(T, B, H)] * (nh - 1 if spec.rounds else 1),
            "u": [(T, B, k) for k in ranks],  # low-rank v @ right.T per round
            "gates": [(T, B, G)],  # activated i, f, g, o
            "c": [(T + 1, B, H)],  # c[0] = c_0, c[t + 1] = c_t
        }
        parts = carve(x, shapes)
        if spec.rounds:
            self.xh = parts["xh"][0]
            self.xs = [x, *parts["xs"], self.xh[..., :I]]
            self.hs = [*parts["hs"], self.xh[..., I:]]
        else:  # no rounds: x is never gated and the x projection is precomputed
            self.xh = None
            self.xs, self.hs = [x], parts["hs"]
        self.u, self.gates, self.c = parts["u"], parts["gates"][0], parts["c"][0]
        # one step's round gates: backward recomputes them from u or v (one small product)
        self.scratch = (x.new_empty(B, I), x.new_empty(B, H))
        self.out = x.new_empty(T, B, H)  # h_t, the layer's output (the caller's, not carved)
        self.w_gates: Tensor | None = None  # the compiled loop's [W_ih W_hh]
        self.kernels = _kernels.available(x)  # fused C pointwise kernels, else torch ops
        self.loop = _kernels.loop_available(x)  # the compiled step loop, else the Python one
        self.on_cpu = x.device.type == "cpu"


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


def forward_step(spec, p: Params, buf: Buffers, t: int, h: Tensor, mask, ops: StepOps) -> Tensor:
    """Step ``t``: Mogrifier rounds, gates, cell update; writes buffers, returns h_t."""
    with one_thread(buf.on_cpu):
        forward_rounds(spec, buf, t, h, mask, ops)
    ops.gates(buf.xh[t], out=buf.gates[t])
    return lstm_pointwise(spec, p, buf, t)


def forward_rounds(spec, buf: Buffers, t: int, h: Tensor, mask, ops: StepOps) -> None:
    """Step ``t``'s Mogrifier rounds: writes every version of x and h into the buffers."""
    xs, hs = buf.xs, buf.hs
    store_state(hs[0][t], h, mask)
    for r, (tgt, src) in enumerate(round_slots(spec.rounds)):
        odd = r % 2 == 0  # rounds count from 1: r = 0 is round 1
        v = hs[src][t] if odd else xs[src][t]
        old = xs[tgt][t] if odd else hs[tgt][t]
        new = xs[tgt + 1][t] if odd else hs[tgt + 1][t]
        s = buf.scratch[0 if odd else 1]
        if spec.low_rank:
            v = ops.round_in[r](v, out=buf.u[r][t])
        ops.round_out[r](v, out=s)
        if buf.kernels:
            _kernels.round_forward(s, old, new)
        else:
            s.sigmoid_()
            torch.mul(s, old, out=new).mul_(2)


def forward_step_x_precomputed(spec, p, buf, t, h, mask, ops, gates_x) -> Tensor:
    """Step ``t`` with no rounds: ``gates_x[t]`` already holds ``x W_ih^T + b``."""
    h_in = buf.hs[0][t]
    store_state(h_in, h, mask)
    torch.add(gates_x[t], ops.gates(h_in), out=buf.gates[t])
    return lstm_pointwise(spec, p, buf, t)


def split_gates(spec: LayerSpec, gates: Tensor):
    """``(i, f, g, o)`` views of a ``(B, G*H)`` gate tensor (``i`` is None if coupled)."""
    if spec.coupled:
        f, g, o = gates.chunk(3, -1)
        return None, f, g, o
    return gates.chunk(4, -1)


def lstm_pointwise(spec: LayerSpec, p: Params, buf: Buffers, t: int) -> Tensor:
    """Activate ``buf.gates[t]`` in place, update the cell; writes and returns ``h_t``."""
    if buf.kernels:
        _kernels.lstm_forward(
            buf.gates[t],
            buf.c[t],
            buf.c[t + 1],
            buf.out[t],
            p.peephole,
            spec.coupled,
            spec.cap_input_gate,
        )
        return buf.out[t]
    i, f, g, o = split_gates(spec, buf.gates[t])
    c_prev, c = buf.c[t], buf.c[t + 1]
    if p.peephole is not None:
        f.addcmul_(p.peephole[1], c_prev)
        if i is not None:
            i.addcmul_(p.peephole[0], c_prev)
    f.sigmoid_()
    g.tanh_()
    torch.mul(f, c_prev, out=c)
    if spec.coupled:
        c.addcmul_(1 - f, g)
    else:
        i.sigmoid_()
        c.addcmul_(torch.minimum(1 - f, i) if spec.cap_input_gate else i, g)
    if p.peephole is not None:
        o.addcmul_(p.peephole[2], c)
    o.sigmoid_()
    return torch.mul(o, torch.tanh(c), out=buf.out[t])


def lstm_pointwise_backward(spec, p, buf, t, dh, dc) -> Tensor:
    """Gradients of step ``t``'s cell update: overwrites ``buf.gates[t]`` with the
    pre-activation gate gradients; returns ``dc_{t-1}``. ``dc`` is updated in place."""
    gates = buf.gates[t]
    if buf.kernels:
        dc = dc.contiguous()
        _kernels.lstm_backward(
            gates,
            buf.c[t],
            buf.c[t + 1],
            dh.contiguous(),
            dc,
            p.peephole,
            spec.coupled,
            spec.cap_input_gate,
        )
        return dc
    i, f, g, o = split_gates(spec, gates)
    c_prev, tanh_c = buf.c[t], torch.tanh(buf.c[t + 1])
    dc.addcmul_(dh * o, 1 - tanh_c * tanh_c)
    dz_o = dh * tanh_c * o * (1 - o)
    if p.peephole is not None:
        dc.addcmul_(dz_o, p.peephole[2])
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
    if p.peephole is not None:
        dc_prev.addcmul_(dz_f, p.peephole[1])
        if dz_i is not None:
            dc_prev.addcmul_(dz_i, p.peephole[0])
    di, dfv, dgv, dov = split_gates(spec, gates)
    if di is not None:
        di.copy_(dz_i)
    dfv.copy_(dz_f)
    dgv.copy_(dz_g)
    dov.copy_(dz_o)
    return dc_prev


class RoundGrads:
    """Weight gradients of the rounds, accumulated over chunks of steps.

    Backward writes each step's ``dz`` (and low-rank ``du``) into a buffer of
    ``chunk`` steps; every full chunk is turned into gradients by a product over
    ``chunk * B`` rows (about ``CHUNK_ROWS``), large enough to run at full speed,
    without keeping a ``(T, B, .)`` gradient buffer per round.
    """

    CHUNK_ROWS = 1024

    def __init__(self, spec: LayerSpec, buf: Buffers, batch: int) -> None:
        T = buf.gates.shape[0]
        self.spec, self.buf = spec, buf
        self.chunk = max(1, min(T, -(-self.CHUNK_ROWS // batch)))
        new = buf.gates.new_empty
        self.dz = [new(self.chunk, batch, s.shape[-1]) for s in self.round_scratch()]
        self.du = [new(self.chunk, batch, u.shape[-1]) for u in buf.u]
        self.grads: list[list[Tensor | None]] = [[] for _ in range(spec.rounds)]

    def round_scratch(self) -> list[Tensor]:
        return [self.buf.scratch[r % 2] for r in range(self.spec.rounds)]

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


def rows(v: Tensor) -> Tensor:
    """``(T, B, n)`` -> ``(T*B, n)`` (a view where the strides allow)."""
    return v.reshape(-1, v.shape[-1])


def rounds_backward(
    spec,
    buf,
    t,
    slot,
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
        if buf.kernels:
            _kernels.round_backward(z, old, d_new, d_old)
        else:
            s = z.sigmoid_()
            torch.mul(s, d_new, out=d_old).mul_(2)
            s.mul_(1 - s).mul_(d_new).mul_(old).mul_(2)  # dz = 2 old d_new s (1 - s)
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


def weight_grads(spec: LayerSpec, p: Params, buf: Buffers, round_grads, db, needs) -> list:
    """All parameter gradients in flat order, given the rounds' (a list per round) and, if
    already summed, the gates' bias gradient ``db``; the gates' weight gradients as
    products over ``T * B`` rows."""
    dgates = rows(buf.gates)
    grads: list[Tensor | None] = [g for parts in round_grads for g in parts]
    if buf.xh is None:
        grads += [dgates.t() @ rows(buf.xs[-1]), dgates.t() @ rows(buf.hs[-1])]
    else:
        dw_cat = dgates.t() @ rows(buf.xh)
        I = buf.xs[0].shape[-1]
        grads += [dw_cat[:, :I].contiguous(), dw_cat[:, I:].contiguous()]
    if spec.bias:
        db = dgates.sum(0) if db is None else db
        grads += [db, db.clone()]
    if spec.peephole:
        dz_i, dz_f, _, dz_o = split_gates(spec, buf.gates)
        c_prev, c = buf.c[:-1], buf.c[1:]
        if dz_i is not None:
            grads.append((dz_i * c_prev).sum((0, 1)))
        grads += [(dz_f * c_prev).sum((0, 1)), (dz_o * c).sum((0, 1))]
    return [g if need else None for g, need in zip(grads, needs, strict=True)]


def run_forward(spec, p, x, h, c0, mask, buf) -> Tensor:
    T = x.shape[0]
    buf.c[0].copy_(c0)
    gates_x = None
    ops = StepOps.forward(spec, p, h.shape[0])
    if spec.rounds == 0:  # x is never gated: project all steps at once
        gates_x = torch.matmul(x, p.weight_ih.t())
        if p.bias is not None:
            gates_x += p.bias
    for t in range(T):
        if gates_x is None:
            h = forward_step(spec, p, buf, t, h, mask, ops)
        else:
            h = forward_step_x_precomputed(spec, p, buf, t, h, mask, ops, gates_x)
    return buf.out


def compiled_layer(
    spec: LayerSpec,
    p: Params,
    buf: Buffers,
    h0: Tensor | None,
    mask: Tensor | None,
    gradients: dict[str, Tensor | None] | None = None,
    accumulators: dict[str, list] | None = None,
) -> Any:
    """The :class:`moglstm.nn._kernels.Layer` the compiled step loop runs on; backward also
    hands in its gradient tensors and the per-thread weight-gradient accumulators."""
    T, B, H = buf.c.shape[0] - 1, buf.c.shape[1], buf.c.shape[2]
    if buf.w_gates is None:  # built once in forward, kept for backward
        buf.w_gates = torch.cat([p.weight_ih, p.weight_hh], 1) if spec.rounds else p.weight_hh
    peep = p.peephole if p.peephole is not None else (None, None, None)
    tensors = {
        "w_gates": buf.w_gates.contiguous(),
        "bias": p.bias,
        **dict(zip(("peep_i", "peep_f", "peep_o"), peep, strict=True)),
        "gates": buf.gates,
        "c": buf.c,
        "out": buf.out,
        "h0": h0,
        "mask": None if mask is None else mask.contiguous(),
        **(gradients or {}),
    }
    lists = {
        "w_left": [w[0].contiguous() for w in p.rounds],
        "w_right": [w[1].contiguous() for w in p.rounds] if spec.low_rank else [],
        "w_bias": p.round_biases,
        "xs": buf.xs,
        "hs": buf.hs,
        "u": buf.u,
        **(accumulators or {}),
    }
    flags = {
        "steps": T,
        "B": B,
        "I": buf.xs[0].shape[-1],
        "H": H,
        "G": p.weight_hh.shape[0],
        "rounds": spec.rounds,
        "low_rank": int(spec.low_rank),
        "coupled": int(spec.coupled),
        "cap": int(spec.cap_input_gate),
    }
    return _kernels.Layer.make(tensors, flags, lists)


def run_forward_compiled(spec, p, x, h, c0, mask, buf) -> Tensor:
    """:func:`run_forward` by the compiled step loop."""
    buf.c[0].copy_(c0)
    if spec.rounds == 0:  # x is never gated: project all steps at once, straight into gates
        torch.mm(rows(x), p.weight_ih.t(), out=rows(buf.gates))
        if p.bias is not None:
            buf.gates += p.bias
    layer = compiled_layer(spec, p, buf, h.contiguous(), mask)
    _kernels.run_rows("mog_forward", layer, x.dtype, _kernels.row_slices(x.shape[1]))
    return buf.out


def backward_compiled(spec, p, buf, mask, d_out, dh, dc):
    """The backward loop by the compiled step loop: returns the input's gradient (with
    rounds), the round gradients (as :attr:`RoundGrads.grads`) and the gates' bias gradient;
    ``dh``, ``dc`` end as those of ``h_0``, ``c_0``. Each thread adds the weight gradients
    of its rows into its own slice of the accumulators; the slices are summed here."""
    T, B = buf.gates.shape[:2]
    slices = _kernels.row_slices(B)
    zeros = functools.partial(buf.gates.new_zeros, len(slices))
    acc = {
        "gw_left": [zeros(*w[0].shape) for w in p.rounds],
        "gw_right": [zeros(*w[1].shape) for w in p.rounds] if spec.low_rank else [],
        "gw_bias": [None if b is None else zeros(*b.shape) for b in p.round_biases],
    }
    gates_bias = zeros(buf.gates.shape[-1]) if spec.bias else None
    dx_all = torch.empty_like(buf.xs[0]) if spec.rounds else None
    gradients = {
        "d_out": d_out,
        "dh": dh,
        "dc": dc,
        "dx": dx_all,
        "g_bias": gates_bias,
        "work": buf.gates.new_empty(B, buf.xh.shape[-1]) if spec.rounds else None,  # d[x_m, h_m]
    }
    layer = compiled_layer(spec, p, buf, None, mask, gradients, acc)
    _kernels.run_rows("mog_backward", layer, dh.dtype, slices, T, 0)
    right = acc["gw_right"] or [None] * spec.rounds
    per_round = zip(acc["gw_left"], right, acc["gw_bias"], strict=True)
    round_grads = [[g.sum(0) for g in parts if g is not None] for parts in per_round]
    return dx_all, round_grads, None if gates_bias is None else gates_bias.sum(0)


class MogrifierLayerFunction(torch.autograd.Function):
    """``(spec, x (T,B,I), h0 (B,H), c0 (B,H), mask (B,H) or None, *flat params)``
    -> ``(output (T,B,H), h_n, c_n)``."""

    @staticmethod
    def forward(ctx, spec: LayerSpec, x, h0, c0, mask, *flat):
        p = unflatten_params(spec, flat)
        buf = Buffers(spec, p, x, h0.shape[1])
        run = run_forward_compiled if buf.loop else run_forward
        out = run(spec, p, x, h0, c0, mask, buf)
        buf.out = None  # the output belongs to the caller; backward does not read it
        h_n, c_n = out[-1].clone(), buf.c[-1].clone()
        ctx.spec, ctx.buf = spec, buf
        ctx.save_for_backward(x, h0, c0, mask, *flat)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        spec, buf = ctx.spec, ctx.buf
        if torch.is_grad_enabled() or buf is None:
            # create_graph=True (second derivatives), or a second backward after the first
            # freed the buffers: recompute with the reference path, which autograd records
            grads = differentiable_backward(
                spec, ctx.saved_tensors, (d_out, d_hn, d_cn), ctx.needs_input_grad[1:]
            )
            return None, *grads[:3], None, *grads[4:]
        _x, _h0, _c0, mask, *flat = ctx.saved_tensors
        p = unflatten_params(spec, flat)
        fresh = torch.contiguous_format  # dh, dc are written in place
        dh = d_hn.clone(memory_format=fresh) if d_hn is not None else torch.zeros_like(buf.c[0])
        dc = d_cn.clone(memory_format=fresh) if d_cn is not None else torch.zeros_like(buf.c[0])
        if buf.loop:
            d_out = None if d_out is None else d_out.contiguous()
            dx_all, round_grads, db = backward_compiled(spec, p, buf, mask, d_out, dh, dc)
        else:
            dx_all, rg, dh, dc = backward_python(spec, p, buf, mask, d_out, dh, dc)
            round_grads, db = rg.grads, None
        if dx_all is None:  # no rounds: the input's gradient in one product
            dx_all = buf.gates @ p.weight_ih
        grads = weight_grads(spec, p, buf, round_grads, db, ctx.needs_input_grad[5:])
        ctx.buf = None
        return None, dx_all, dh, dc, None, *grads


def backward_python(spec, p, buf, mask, d_out, dh, dc):
    """The backward loop in Python: returns the input's gradient (with rounds), the round
    gradients, and the gradients of ``h_0`` and ``c_0``."""
    T, B = buf.gates.shape[:2]
    I = buf.xs[0].shape[-1]
    dx_all = torch.empty_like(buf.xs[0]) if spec.rounds else None
    back = StepOps.backward(spec, p, B)
    recompute = StepOps.round_outputs(p, B)  # the rounds' forward products, not the gates
    rg = RoundGrads(spec, buf, B)
    for steps in rg.chunks(T):
        for t in steps:
            if d_out is not None:
                dh = dh + d_out[t]
            dc = lstm_pointwise_backward(spec, p, buf, t, dh, dc)
            dxh = back.gates(buf.gates[t])  # (B, I + H): d x_m and d h_m at once, or d h_m
            if spec.rounds:
                slot = t - steps[-1]
                with one_thread(buf.on_cpu):
                    dx, dh_m = dxh[:, :I], dxh[:, I:]
                    dh = rounds_backward(
                        spec, buf, t, slot, dx, dh_m, recompute, back, rg, dx_all[t]
                    )
            else:
                dh = dxh
            if mask is not None:
                dh = dh * mask
        rg.flush(steps)
    return dx_all, rg, dh, dc


FUSED_DTYPES = (torch.float32, torch.float64)


def run_direction_fused(
    x: Tensor, h: Tensor, c: Tensor, w, reverse: bool = False, state_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`moglstm.nn.rnn.run_direction_reference` for unpacked
    input ``x`` of shape ``(T, B, I)``."""
    round_weights = w.mogrifier_weights
    spec = LayerSpec(
        rounds=len(round_weights),
        low_rank=bool(round_weights) and isinstance(round_weights[0], tuple),
        round_bias=bool(round_weights) and w.mogrifier_biases[0] is not None,
        bias=w.bias_ih is not None,
        coupled=w.variants["coupled"],
        peephole=w.variants["peephole"] is not None,
        cap_input_gate=w.variants["cap_input_gate"],
    )
    if reverse:
        x = x.flip(0)
    out, h_n, c_n = MogrifierLayerFunction.apply(
        spec, x.contiguous(), h.contiguous(), c.contiguous(), state_mask, *flatten_params(spec, w)
    )
    return (out.flip(0) if reverse else out), h_n, c_n
