"""The Triton backend: the step loop of :mod:`moglstm.nn.backends.torch_loop` in Triton
kernels, for NVIDIA GPUs (and on CPU under ``TRITON_INTERPRET=1``, for the tests).

A phased design: each step is a few kernel launches, every one on the whole batch.

forward, per step
    the state (masked) copied into the window buffer; per Mogrifier round one launch
    ``new = 2 sigmoid(v W^T + b) old`` (two for a low-rank round: ``u = v R^T`` first);
    one launch for the gates' product on ``[x_m, h_m]`` fused with the cell update.
backward, per step
    one pointwise launch for the cell update's backward (adding the output's gradient);
    one product ``d[x_m, h_m] = dgates [W_ih W_hh]``; per round one launch that recomputes
    the round's gate and writes ``dz`` and the gated vector's gradient, and one (two if
    low rank) product back to the gating vector's gradient; the state mask.
after the backward loop
    the weight gradients as a few large products over ``T * B`` rows (cuBLAS), as the
    other step-loop backends do (:func:`~moglstm.nn.backends.buffers.weight_grads`).

Nothing in the step loop allocates, synchronises with the host, or depends on data (so
it can be captured in a CUDA graph; tests/nn/test_triton.py checks this on CPU). All
kernels accumulate in float32: float32 operands run as TF32 on the tensor cores when
``torch.backends.cuda.matmul.allow_tf32`` is set (exact IEEE float32 otherwise), float16
and bfloat16 operands as themselves.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from moglstm.nn.backends.base import FusedBackend
from moglstm.nn.backends.buffers import Buffers, fresh_grad, round_slots, weight_grads
from moglstm.nn.backends.torch_loop import RoundGrads, gates_weight, store_state
from moglstm.nn.direction import Direction, DirectionSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(x: Tensor) -> str | None:
    """Why the Triton backend cannot run on tensors like ``x``, or None if it can."""
    if not installed():
        return "triton is not installed (it ships with CUDA builds of torch)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (it takes float32, float16, bfloat16)"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu" and interpreting():
        return None
    return (
        f"tensors on {x.device.type}: it runs on CUDA devices, or on CPU under Triton's "
        "interpreter (TRITON_INTERPRET=1, for tests)"
    )


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one kernel launch: rows (batch), columns, reduction."""

    m: int
    n: int
    k: int


def linear_tiles(M: int, N: int, K: int) -> Tiles:
    """Tiles of :func:`linear_kernel`: 16..64 batch rows (tl.dot needs 16), 32 or 64
    columns, 32 of the reduction."""
    m = 16 if M <= 16 else (32 if M <= 32 else 64)
    return Tiles(m, 64 if N >= 512 else 32, 32)


def gates_tiles(B: int, H: int) -> Tiles:
    """Tiles of :func:`gates_cell_kernel`: a batch tile and 16 or 32 hidden units (four
    gate blocks each, so 64 or 128 gate rows per program), 32 of the reduction."""
    m = 16 if B <= 16 else (32 if B <= 32 else 64)
    return Tiles(m, 32 if H >= 2048 else 16, 32)


POINTWISE = Tiles(16, 64, 1)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 when torch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _kernels():
    from moglstm.nn.backends import triton_kernels

    return triton_kernels


def linear(a: Tensor, w: Tensor, out: Tensor, bias: Tensor | None = None, *, accumulate=False):
    """``out (+)= a @ w.T + bias``: ``a (M, K)``, ``w (N, K)`` (any strides), ``out (M, N)``
    with rows of unit stride."""
    _launch_linear(a, w, bias, out, None, None, None, _kernels().STORE, accumulate)


def round_forward(v: Tensor, w: Tensor, bias: Tensor | None, old: Tensor, new: Tensor) -> None:
    """``new = 2 sigmoid(v @ w.T + bias) * old``."""
    _launch_linear(v, w, bias, new, old, None, None, _kernels().ROUND_FORWARD, False)


def round_backward(v, w, bias, old, d_new, dz, d_old) -> None:
    """With ``s = sigmoid(v @ w.T + bias)``: ``dz = 2 old d_new s (1 - s)``,
    ``d_old = 2 s d_new`` (``d_old`` may be ``d_new`` itself)."""
    _launch_linear(v, w, bias, dz, old, d_new, d_old, _kernels().ROUND_BACKWARD, False)


def _launch_linear(a, w, bias, out, old, d_new, d_old, mode, accumulate) -> None:
    M, K = a.shape
    N = w.shape[0]
    t = linear_tiles(M, N, K)
    grid = (-(-M // t.m), -(-N // t.n))
    stride0 = [v.stride(0) if v is not None else 0 for v in (out, old, d_new, d_old)]
    _kernels().linear_kernel[grid](
        a,
        w,
        out if bias is None else bias,
        out,
        out if old is None else old,
        out if d_new is None else d_new,
        out if d_old is None else d_old,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        *stride0,
        MODE=mode,
        HAS_BIAS=bias is not None,
        ACC=accumulate,
        PRECISION=precision(a.dtype),
        BM=t.m,
        BN=t.n,
        BK=t.k,
    )


def gates_cell(
    spec: DirectionSpec,
    xh: Tensor,
    w: Tensor,
    bias: Tensor | None,
    pre: Tensor | None,
    c_prev: Tensor,
    gates: Tensor,
    c: Tensor,
    h: Tensor,
    peephole,
) -> None:
    """``gates = act(xh @ w.T + bias + pre)``, ``c``, ``h`` of one step (``w`` contiguous,
    ``c_prev``, ``c``, ``h`` contiguous ``(B, H)``)."""
    B, K = xh.shape
    H = spec.hidden_size
    t = gates_tiles(B, H)
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    _kernels().gates_cell_kernel[(-(-B // t.m), -(-H // t.n))](
        xh,
        w,
        c if bias is None else bias,
        c if pre is None else pre,
        c_prev,
        gates,
        c,
        h,
        c if p_i is None else p_i,
        c if p_f is None else p_f,
        c if p_o is None else p_o,
        B,
        H,
        K,
        xh.stride(0),
        w.stride(0),
        0 if pre is None else pre.stride(0),
        gates.stride(0),
        COUPLED=spec.coupled,
        CAP=spec.cap_input_gate,
        PEEP=spec.peephole,
        HAS_BIAS=bias is not None,
        HAS_PRE=pre is not None,
        PRECISION=precision(xh.dtype),
        BB=t.m,
        BH=t.n,
        BK=t.k,
    )


def cell_backward(spec, gates, c_prev, c, dh, d_out, dc, peephole) -> None:
    """In place: ``gates`` (activations) -> pre-activation gradients, ``dc`` ->
    ``dc_{t-1}``, for the gradient ``dh (+ d_out)`` of ``h_t``."""
    B, H = dc.shape
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    t = POINTWISE
    _kernels().cell_backward_kernel[(-(-B // t.m), -(-H // t.n))](
        gates,
        c_prev,
        c,
        dh,
        dc if d_out is None else d_out,
        dc,
        dc if p_i is None else p_i,
        dc if p_f is None else p_f,
        dc if p_o is None else p_o,
        B,
        H,
        gates.stride(0),
        dh.stride(0),
        COUPLED=spec.coupled,
        CAP=spec.cap_input_gate,
        PEEP=spec.peephole,
        HAS_DOUT=d_out is not None,
        BB=t.m,
        BH=t.n,
    )


class TritonLoop(FusedBackend):
    """The step loop in Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def forward(self, spec, x, h0, c0, mask, flat):
        d = Direction.from_flat(spec, flat)
        buf = Buffers(spec, x)
        T, B, _ = x.shape
        out = x.new_empty(T, B, spec.hidden_size)
        buf.c[0].copy_(c0)
        w = gates_weight(d).contiguous()
        pre = None
        if spec.rounds == 0:  # x is never gated: project all steps at once (cuBLAS)
            pre = torch.matmul(x, d.weight_ih.t())
            if d.gates_bias is not None:
                pre += d.gates_bias
        bias = d.gates_bias if spec.rounds else None
        rounds = [(r.left.contiguous(), r.right, r.bias) for r in d.rounds]
        slots = round_slots(spec.rounds)
        h = h0
        for t in range(T):
            store_state(buf.hs[0][t], h, mask)
            for r, ((tgt, src), (left, right, b)) in enumerate(zip(slots, rounds, strict=True)):
                odd = r % 2 == 0  # rounds count from 1
                gated, gating = (buf.xs, buf.hs) if odd else (buf.hs, buf.xs)
                v = gating[src][t]
                if right is not None:
                    linear(v, right, buf.u[r][t])
                    v = buf.u[r][t]
                round_forward(v, left, b, gated[tgt][t], gated[tgt + 1][t])
            xh = buf.xh[t] if spec.rounds else buf.hs[0][t]
            step_pre = None if pre is None else pre[t]
            gates_cell(
                spec,
                xh,
                w,
                bias,
                step_pre,
                buf.c[t],
                buf.gates[t],
                buf.c[t + 1],
                out[t],
                d.peephole,
            )
            h = out[t]
        return out, out[-1].clone(), buf.c[-1].clone(), (buf.arena,)

    def backward(self, spec, x, mask, flat, saved, d_out, d_hn, d_cn):
        d = Direction.from_flat(spec, flat)
        buf = Buffers(spec, x, *saved)
        T, B, I = x.shape
        dh, dc = fresh_grad(d_hn, buf.c[0]), fresh_grad(d_cn, buf.c[0])
        d_out = None if d_out is None else d_out.contiguous()
        w = gates_weight(d)  # d[x_m, h_m] = dgates @ w: w.t() is read through its strides
        dx_all = torch.empty_like(x) if spec.rounds else None
        dxh = x.new_empty(B, w.shape[1])  # one step's d[x_m, h_m] (or d h_m)
        rg = RoundGrads(spec, buf, B, chunk=T)  # one flush, after the loop: no allocations in it
        slots = round_slots(spec.rounds)
        for steps in rg.chunks(T):
            for t in steps:
                cell_backward(
                    spec,
                    buf.gates[t],
                    buf.c[t],
                    buf.c[t + 1],
                    dh,
                    None if d_out is None else d_out[t],
                    dc,
                    d.peephole,
                )
                linear(buf.gates[t], w.t(), dxh)
                if spec.rounds:
                    dx, dh = dxh[:, :I], dxh[:, I:]
                    for r in reversed(range(spec.rounds)):
                        dx, dh = self.round_back(
                            spec, d, buf, t, t - steps[-1], r, slots[r], dx, dh, rg, dx_all[t]
                        )
                else:
                    dh = dxh
                if mask is not None:
                    dh.mul_(mask)
            rg.flush(steps)
        if dx_all is None:  # no rounds: the input's gradient in one product
            dx_all = buf.gates @ d.weight_ih
        return dx_all, dh, dc, weight_grads(spec, buf, rg.grads, None)

    @staticmethod
    def round_back(spec, d, buf, t, slot, r, slot_r, dx, dh, rg, dx_out):
        """Back through round ``r`` of step ``t``; returns the new ``(dx, dh)``. The gated
        vector's gradient replaces ``d_new`` in place (into ``dx_out`` for round 1)."""
        tgt, src = slot_r
        odd = r % 2 == 0
        rw = d.rounds[r]
        d_new = dx if odd else dh
        old = buf.xs[tgt][t] if odd else buf.hs[tgt][t]
        v = buf.u[r][t] if spec.low_rank else (buf.hs[src][t] if odd else buf.xs[src][t])
        d_old = dx_out if r == 0 else d_new
        dz = rg.dz[r][slot]
        round_backward(v, rw.left, rw.bias, old, d_new, dz, d_old)
        into = dh if odd else dx  # the gating vector's gradient, accumulated in place
        if spec.low_rank:
            du = rg.du[r][slot]
            linear(dz, rw.left.t(), du)
            linear(du, rw.right.t(), into, accumulate=True)
        else:
            linear(dz, rw.left.t(), into, accumulate=True)
        return (d_old, dh) if odd else (dx, d_old)


TRITON = TritonLoop()


def self_check_problem(device: torch.device, dtype: torch.dtype):
    """A small problem exercising rounds, low rank, peepholes, ragged sizes and state."""
    from moglstm.nn import MogrifierLSTM

    g = torch.Generator().manual_seed(0)
    ref = MogrifierLSTM(
        19, 37, num_layers=1, mogrify_rounds=5, mogrify_rank=7, implementation="reference"
    )
    x = torch.randn(5, 3, 19, generator=g)
    hx = tuple(torch.randn(1, 3, 37, generator=g) for _ in range(2))
    return ref.to(device, dtype), x.to(device, dtype), tuple(h.to(device, dtype) for h in hx)


@functools.cache
def self_check(device: str, dtype: torch.dtype) -> bool:
    """Whether the Triton backend matches the reference on a small problem on ``device``
    (outputs and every gradient, relative error under 1e-2 for 16-bit dtypes, 1e-3 for
    float32); warns once on a mismatch or an error. Cached per device and dtype."""
    try:
        ref, x, hx = self_check_problem(torch.device(device), dtype)
        got = _run_both(ref, x, hx)
        tol = 1e-3 if dtype == torch.float32 else 2e-2
        worst = max(_rel(a, b) for a, b in got)
        if worst <= tol and all(torch.isfinite(b).all() for _, b in got):
            return True
        problem = f"relative error {worst:.2e} > {tol:.0e}"
    except Exception as err:  # a compiler or driver failure: report it, fall back
        problem = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"moglstm: the Triton backend failed its self-check on {device} ({dtype}): {problem}; "
        "implementation='auto' uses the torch-ops step loop there",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


def _run_both(ref, x, hx):
    from moglstm.nn.backends import REFERENCE
    from moglstm.nn.direction import Steps

    results = []
    for backend in (REFERENCE, TRITON):
        xs = x.clone().requires_grad_()
        h, c = (v[0].clone().requires_grad_() for v in hx)
        d = ref.direction(0, 0)
        out, hn, cn = backend.run(Steps(xs, None), h, c, d, False, None)
        params = [p for p in ref.parameters()]
        loss = (
            out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
        ).sum()
        loss = loss + hn.float().sum() * 2 - cn.float().sum()
        grads = torch.autograd.grad(loss, [xs, h, c, *params], allow_unused=True)
        results.append([out, hn, cn, *[g for g in grads if g is not None]])
    return list(zip(results[0], results[1], strict=True))
