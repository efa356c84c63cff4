"""The Triton backend: the step loop of :mod:`moglstm.nn.backends.torch_loop` in Triton
kernels, for NVIDIA GPUs (and on CPU under ``TRITON_INTERPRET=1``, for the tests).

A phased design: each step is a few kernel launches, every one on the whole batch.

forward, per step
    per Mogrifier round one launch ``new = 2 sigmoid(v W^T + b) old`` (low rank
    ``u = v R^T`` and the gated product in the same launch up to rank 128); one launch
    for the gates' product on ``[x_m, h_m]`` fused with the cell update, which also
    writes ``h_t`` (times the state-dropout mask) into the next step's window slot.
backward, per step
    one pointwise launch for the cell update's backward (adding the output's gradient);
    one launch for ``d[x_m, h_m] = dgates [W_ih W_hh]``, the half the last round gated
    going on to that round's backward (its gate recomputed, its ``dz`` and its input's
    gradient written); per round one product of ``dz`` back to the gating vector's
    gradient, in the same launch chained to the backward of the round below (the gating
    vector is that round's gated vector, and its gradient is now complete), or for
    round 1 times the state mask. So ``r + 1`` launches forward and ``r + 2`` backward
    per step (6 and 7 for 5 rounds; the weights ``W_ih``, ``W_hh`` are never
    concatenated).
after the backward loop
    the weight gradients as a few large products over ``T * B`` rows (cuBLAS), as the
    other step-loop backends do (:func:`~moglstm.nn.backends.buffers.weight_grads`).

Nothing in the step loop allocates, synchronises with the host, or depends on data, so
a whole window, forward or backward, is captured in one CUDA graph and replayed on later
calls of the same shapes (:mod:`moglstm.nn.backends.graphs`; tests/nn/test_triton_graph.py
checks the loop on CPU). All
kernels accumulate in float32: float32 operands run as TF32 on the tensor cores when
torch allows TF32 for matmuls (``allow_tf32``, or the newer ``fp32_precision = "tf32"``;
exact IEEE float32 otherwise), float16
and bfloat16 operands as themselves.

Why one module of over 700 lines: the tile, warp and precision choices at its top are read
by every launch wrapper, by the forward and backward step loops and by the self-check
below them; split, each part would import the others' internals. The kernels themselves
(``@triton.jit``) are apart, in :mod:`moglstm.nn.backends.triton_kernels`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moglstm.nn.backends import graphs
from moglstm.nn.backends.base import FusedBackend, Saved
from moglstm.nn.backends.buffers import (
    Buffers,
    arena_shape,
    fresh_grad,
    round_slots,
    start_window,
    weight_grads,
)
from moglstm.nn.backends.torch_loop import RoundGrads, store_state
from moglstm.nn.direction import Direction, DirectionSpec

logger = logging.getLogger(__name__)
# (device, dtype, precision) whose kernels were announced as compiling (logging, INFO)
ANNOUNCED: set[tuple[str, torch.dtype, str]] = set()
STORE, ROUND_FORWARD = 0, 1  # the products' epilogues (triton_kernels)
# the window's cell states in float32 whatever the operand dtype, as cuDNN keeps them
# (tests/nn/test_triton.py::test_cell_state_drift_over_500_steps measures why)
CELL_F32 = True
CELL_POINTERS = ("c_prev_ptr", "c_ptr", "dc_ptr")  # the kernels' float32 arguments then
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


# The tiles the dispatcher picks from: a batch tile of 16 rows (tl.dot's minimum) for
# batches up to 16, else 64; 64 output columns of a product, 16 hidden units (four gate
# blocks: 64 gate rows) of the gates' kernel; 32 of every reduction.
BATCH_TILES = (16, 64)
LINEAR_N, GATES_H, REDUCTION = 64, 16, 32
# a low-rank round's two products run as one launch for ranks up to 128, padded to these
RANK_TILES = (32, 128)
POINTWISE = Tiles(16, 64, 1)


def batch_tile(rows: int) -> int:
    return BATCH_TILES[0] if rows <= BATCH_TILES[0] else BATCH_TILES[1]


def linear_tiles(M: int) -> Tiles:
    return Tiles(batch_tile(M), LINEAR_N, REDUCTION)


def gates_back_tiles(M: int, dtype: torch.dtype | str, prec: str) -> Tiles:
    """``gates_back_kernel``'s: as a product's, with 32 output columns for IEEE float32
    (with 64, the ahead-of-time check found registers spilled on sm_80 at 64-row tiles:
    Triton 3.9 with reduction tiles of 32, Triton 3.6 with 16 too)."""
    t = linear_tiles(M)
    ieee_fp32 = dtype in (torch.float32, "fp32") and prec == "ieee"
    return Tiles(t.m, 32, t.k) if ieee_fp32 else t


def gates_tiles(B: int) -> Tiles:
    return Tiles(batch_tile(B), GATES_H, REDUCTION)


def warps(dtype: torch.dtype | str) -> int:
    """Warps per program of the product kernels: 8 for float32 operands (their IEEE and
    TF32 tiles need twice the registers: with 4 warps the 64-row and rank-128 tiles
    spilled to local memory in the ahead-of-time compile check), else Triton's 4."""
    return 8 if dtype in (torch.float32, "fp32") else 4


def linear_warps(dtype: torch.dtype | str, t: Tiles) -> int:
    """Warps per program of ``linear_kernel``: as :func:`warps`, and 8 for 64-row tiles of
    16-bit operands too (with 4, Triton 3.6 spilled registers in the round-forward
    epilogue on sm_80; Triton 3.9 did not)."""
    return 8 if t.m == BATCH_TILES[1] else warps(dtype)


def chain_warps(dtype: torch.dtype | str, t: Tiles) -> int:
    """Warps per program of ``round_chain_kernel``: as ``linear_kernel``'s (it holds two
    accumulators where that holds one, so never fewer)."""
    return linear_warps(dtype, t)


# Speed lever (docs/gpu.md): "one" runs a low-rank round's two products in one launch
# where the rank allows (every column program recomputes u = v R^T: 13x the useful
# work at rank 84, one launch); "two" always in two (u made once, then the gated
# product: one more dependent launch per round and direction). Which wins is the GPU's
# to say (benchmarks/gpu_check.py times both); set with MOGLSTM_TRITON_LOW_RANK or
# set_low_rank_launches().
LOW_RANK_LAUNCHES = os.environ.get("MOGLSTM_TRITON_LOW_RANK", "one")
if LOW_RANK_LAUNCHES not in ("one", "two"):
    raise ValueError(f"MOGLSTM_TRITON_LOW_RANK must be 'one' or 'two', got {LOW_RANK_LAUNCHES!r}")


def set_low_rank_launches(mode: str) -> str:
    """Set :data:`LOW_RANK_LAUNCHES` (``"one"`` or ``"two"``); frees the captured CUDA
    graphs (they hold the other mode's launches); returns the previous mode."""
    global LOW_RANK_LAUNCHES
    if mode not in ("one", "two"):
        raise ValueError(f"low-rank launches must be 'one' or 'two', got {mode!r}")
    previous, LOW_RANK_LAUNCHES = LOW_RANK_LAUNCHES, mode
    graphs.GRAPHS.clear()
    return previous


def rank_tile(rank: int, dtype: torch.dtype) -> int | None:
    """The padded rank of the one-launch low-rank kernel, or None (two launches): ranks
    over 128, and IEEE float32 products on a GPU, whose one-launch tiles spill registers
    on sm_80/sm_90 even with 8 warps (found by the ahead-of-time compile check; the
    interpreter, which has no registers, keeps testing the kernel in float32); and
    always where :data:`LOW_RANK_LAUNCHES` is ``"two"``."""
    if LOW_RANK_LAUNCHES == "two":
        return None
    if dtype == torch.float32 and precision(dtype) == "ieee" and not interpreting():
        return None
    return next((k for k in RANK_TILES if rank <= k), None)


def tf32_allowed() -> bool:
    """Whether torch runs float32 matmuls as TF32, set by either API: reading the legacy
    ``allow_tf32`` raises once the new ``fp32_precision`` was set, which reflects both."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return matmul.allow_tf32


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 when torch allows it for matmuls."""
    if dtype == torch.float32 and not interpreting() and tf32_allowed():
        return "tf32"
    return "ieee"


def linear_constexprs(mode: int, bias: bool, prec: str, t: Tiles) -> dict:
    return {
        "MODE": mode,
        "HAS_BIAS": bias,
        "PRECISION": prec,
        "BM": t.m,
        "BN": t.n,
        "BK": t.k,
    }


def two_product_constexprs(mode: int, bias: bool, prec: str, t: Tiles, kp: int) -> dict:
    return {**linear_constexprs(mode, bias, prec, t), "KP": kp}


def variant_constexprs(spec_or_flags: Any) -> dict:  # a DirectionSpec, or its flags
    s = spec_or_flags
    return {"COUPLED": s.coupled, "CAP": s.cap_input_gate, "PEEP": s.peephole}


def gates_constexprs(
    variant: dict, bias: bool, pre: bool, prec: str, t: Tiles, next_h: bool, mask: bool
) -> dict:
    return {
        **variant,
        "HAS_BIAS": bias,
        "HAS_PRE": pre,
        "NEXT": next_h,
        "MASK": mask,
        "PRECISION": prec,
        "BB": t.m,
        "BH": t.n,
        "BK": t.k,
    }


def chain_constexprs(
    kp: int | None, accumulate: bool, mask: bool, chain: bool, bias: bool, prec: str, t: Tiles
) -> dict:
    """``round_chain_kernel``'s: ``kp`` the padded rank of a one-launch low-rank product
    (None: one product)."""
    return {
        "TWO": kp is not None,
        "ACC": accumulate,
        "MASK": mask,
        "CHAIN": chain,
        "HAS_BIAS": bias,
        "PRECISION": prec,
        "BM": t.m,
        "BN": t.n,
        "BK": t.k,
        "KP": kp or 16,
    }


def gates_back_constexprs(gated_x: bool, bias: bool, prec: str, t: Tiles) -> dict:
    return {
        "GATED_X": gated_x,
        "HAS_BIAS": bias,
        "PRECISION": prec,
        "BM": t.m,
        "BN": t.n,
        "BK": t.k,
    }


def cell_backward_constexprs(variant: dict, d_out: bool) -> dict:
    return {**variant, "HAS_DOUT": d_out, "BB": POINTWISE.m, "BH": POINTWISE.n}


# -- every kernel configuration the dispatcher can pick (for the ahead-of-time checks)

# (operand dtype, tl.dot precision) pairs: float32 as IEEE or TF32, float16, bfloat16
OPERANDS = (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee"))
# (coupled, cap_input_gate, peephole): coupled and capped never come together
VARIANTS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1))
# the variants with the most code: each kernel's other variants are subsets of one of them
WIDEST_VARIANTS = ((0, 1, 1), (1, 0, 1))


def kernel_configs(which: str = "all") -> list[tuple[str, str, dict, int]]:
    """``(kernel name, operand dtype, constexprs, warps)`` of every configuration the
    launchers above can pick (``"all"``), or of those whose code contains every other's
    (``"widest"``: the widest variants, every flag that adds code on)."""
    from moglstm.nn.backends import triton_kernels as k

    widest = which == "widest"
    # (mode, bias) of linear_kernel and two_product_kernel
    linear_flags = [(k.STORE, False), (k.ROUND_FORWARD, True)]
    if not widest:
        linear_flags.append((k.ROUND_FORWARD, False))
    two_product_flags = [(k.ROUND_FORWARD, True)] + ([] if widest else [(k.ROUND_FORWARD, False)])
    gate_inputs = [(True, False)] if widest else [(True, False), (False, False), (False, True)]
    # (next_h, mask): the fed-back state stored by the gates' kernel, masked or not
    gate_outputs = [(True, True)] if widest else [(False, False), (True, False), (True, True)]
    # (accumulate, mask, chain, bias) of round_chain_kernel: a round's product chained
    # to the round below, the last product of a step (masked or not), no rounds (masked
    # or not)
    chain_flags = [(True, False, True, True), (True, True, False, False)]
    if not widest:
        chain_flags += [(True, False, True, False), (True, False, False, False)]
        chain_flags += [(False, True, False, False), (False, False, False, False)]
    variants = [
        dict(zip(("COUPLED", "CAP", "PEEP"), map(bool, v), strict=True))
        for v in (WIDEST_VARIANTS if widest else VARIANTS)
    ]
    out = []
    for dtype, prec in OPERANDS:
        for m in BATCH_TILES:
            for mode, bias in linear_flags:
                tiles = Tiles(m, LINEAR_N, REDUCTION)
                cx = linear_constexprs(mode, bias, prec, tiles)
                out.append(("linear_kernel", dtype, cx, linear_warps(dtype, tiles)))
            for kp in RANK_TILES if (dtype, prec) != ("fp32", "ieee") else ():
                for mode, bias in two_product_flags:
                    tiles = Tiles(m, LINEAR_N, REDUCTION)
                    cx = two_product_constexprs(mode, bias, prec, tiles, kp)
                    out.append(("two_product_kernel", dtype, cx, warps(dtype)))
            tiles = Tiles(m, LINEAR_N, REDUCTION)
            one_launch = (dtype, prec) != ("fp32", "ieee")
            for kp in (None, *(RANK_TILES if one_launch else ())):
                for acc, mask, chain, bias in chain_flags:
                    if kp is not None and not acc:
                        continue  # the one-launch low-rank product is never the first
                    cx = chain_constexprs(kp, acc, mask, chain, bias, prec, tiles)
                    out.append(("round_chain_kernel", dtype, cx, chain_warps(dtype, tiles)))
            for gated_x in (True, False):  # the half of d[x_m, h_m] the last round gated
                for bias in (True,) if widest else (True, False):
                    gt = gates_back_tiles(m, dtype, prec)
                    cx = gates_back_constexprs(gated_x, bias, prec, gt)
                    out.append(("gates_back_kernel", dtype, cx, chain_warps(dtype, gt)))
            for variant in variants:
                for bias, pre in gate_inputs:
                    for next_h, mask in gate_outputs:
                        tiles = Tiles(m, GATES_H, REDUCTION)
                        cx = gates_constexprs(variant, bias, pre, prec, tiles, next_h, mask)
                        out.append(("gates_cell_kernel", dtype, cx, warps(dtype)))
        if prec == "ieee":  # no products: one configuration per dtype
            for variant in variants:
                for d_out in (True,) if widest else (True, False):
                    cx = cell_backward_constexprs(variant, d_out)
                    out.append(("cell_backward_kernel", dtype, cx, 4))
    return out


def _kernels() -> Any:  # the module of @triton.jit kernels, imported on first use
    from moglstm.nn.backends import triton_kernels

    return triton_kernels


def unit_columns(*tensors: Tensor | None) -> None:
    """The kernels index these by row stride alone: a column stride other than 1 would
    read the wrong memory (a bug in the step loops, never the caller's input)."""
    for t in tensors:
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise RuntimeError(f"column stride {t.stride(-1)} where the kernels assume 1")


def linear(a: Tensor, w: Tensor, out: Tensor, bias: Tensor | None = None) -> None:
    """``out = a @ w.T + bias``: ``a (M, K)``, ``w (N, K)`` (any strides), ``out (M, N)``
    of unit column stride."""
    _launch_linear(a, w, bias, out, None, STORE)


def round_forward(v: Tensor, w: Tensor, bias: Tensor | None, old: Tensor, new: Tensor) -> None:
    """``new = 2 sigmoid(v @ w.T + bias) * old``."""
    _launch_linear(v, w, bias, new, old, ROUND_FORWARD)


def _launch_linear(
    a: Tensor, w: Tensor, bias: Tensor | None, out: Tensor, old: Tensor | None, mode: int
) -> None:
    M, K = a.shape
    N = w.shape[0]
    t = linear_tiles(M)
    grid = (-(-M // t.m), -(-N // t.n))
    _kernels().linear_kernel[grid](
        a,
        w,
        out if bias is None else bias,
        out,
        out if old is None else old,
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        0 if old is None else old.stride(0),
        **linear_constexprs(mode, bias is not None, precision(a.dtype), t),
        num_warps=linear_warps(a.dtype, t),
    )


def two_products(
    a: Tensor,
    w1: Tensor,
    w2: Tensor,
    p: Tensor,
    out: Tensor,
    bias: Tensor | None = None,
    old: Tensor | None = None,
    *,
    mode: int,
) -> None:
    """``p = a @ w1.T`` (written), then ``out = z`` or ``out = 2 sigmoid(z) old`` for
    ``z = p @ w2.T + bias``, in one launch (``rank_tile(w1.shape[0])`` must not be None).
    ``a``, ``p``, ``out``, ``old``: unit column stride; ``w1``, ``w2`` any strides."""
    M, K = a.shape
    rank, N = w1.shape[0], w2.shape[0]
    t = linear_tiles(M)
    cx = two_product_constexprs(
        mode, bias is not None, precision(a.dtype), t, rank_tile(rank, a.dtype)
    )
    _kernels().two_product_kernel[(-(-M // t.m), -(-N // t.n))](
        a,
        w1,
        w2,
        p,
        out if bias is None else bias,
        out,
        out if old is None else old,
        M,
        N,
        K,
        rank,
        a.stride(0),
        w1.stride(0),
        w1.stride(1),
        w2.stride(0),
        w2.stride(1),
        p.stride(0),
        out.stride(0),
        0 if old is None else old.stride(0),
        **cx,
        num_warps=warps(a.dtype),
    )


def round_chain(
    a: Tensor,
    w2: Tensor,
    out: Tensor,
    *,
    w1: Tensor | None = None,
    p: Tensor | None = None,
    accumulate: bool = True,
    mask: Tensor | None = None,
    below: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor] | None = None,
) -> None:
    """``d = out (+ if accumulate) a @ w2.T`` (low rank in one launch with ``w1``:
    ``p = a @ w1.T`` written and ``d = out + p @ w2.T``), then either ``out = d * mask``
    (``mask`` or not), or, with ``below = (v, wv, bias, old, dz, d_old)``, the backward of
    the round below for ``d_new = d`` and ``s = sigmoid(v @ wv.T + bias)``:
    ``dz = 2 old d_new s (1 - s)``, ``d_old = 2 s d_new`` (``out`` is then not written;
    ``d_old`` may be its memory). Every operand except ``a``, ``w1``, ``w2``, ``v``, ``wv``
    (any strides): unit column stride."""
    unit_columns(out, p, mask, *(below or ())[3:])
    M, K = a.shape
    N = w2.shape[0]
    t = linear_tiles(M)
    kp = None if w1 is None else rank_tile(w1.shape[0], a.dtype)
    v, wv, bias, old, dz, d_old = below if below is not None else (out,) * 6
    cx = chain_constexprs(
        kp,
        accumulate,
        mask is not None,
        below is not None,
        bias is not None,
        precision(a.dtype),
        t,
    )
    _kernels().round_chain_kernel[(-(-M // t.m), -(-N // t.n))](
        a,
        out if w1 is None else w1,
        w2,
        out if p is None else p,
        out,
        out if mask is None else mask,
        v,
        wv,
        out if bias is None else bias,
        old,
        dz,
        d_old,
        M,
        N,
        K,
        0 if w1 is None else w1.shape[0],
        v.shape[1],
        a.stride(0),
        a.stride(1),
        0 if w1 is None else w1.stride(0),
        0 if w1 is None else w1.stride(1),
        w2.stride(0),
        w2.stride(1),
        0 if p is None else p.stride(0),
        out.stride(0),
        0 if mask is None else mask.stride(0),
        *below_strides(v, wv, old, dz, d_old),
        **cx,
        num_warps=chain_warps(a.dtype, t),
    )


def below_strides(v: Tensor, wv: Tensor, old: Tensor, dz: Tensor, d_old: Tensor) -> tuple:
    """The strides a chained round backward (``_round_below``) reads, in its order."""
    return (*v.stride(), *wv.stride(), old.stride(0), dz.stride(0), d_old.stride(0))


def gates_back(
    spec: DirectionSpec,
    dgates: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    dxh: Tensor,
    top: tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor],
) -> None:
    """``dxh = dgates [w_ih w_hh]`` ``(B, I + H)`` (weights not concatenated; all but ``v``
    and ``wv`` of unit column stride), except the half the last round gated: that goes
    on to the last round's backward, ``top = (v, wv, bias, old, dz, d_old)`` as in
    :func:`round_chain`."""
    unit_columns(dgates, w_ih, w_hh, dxh, *top[3:])
    M, G = dgates.shape
    I, H = w_ih.shape[1], w_hh.shape[1]
    t = gates_back_tiles(M, dgates.dtype, precision(dgates.dtype))
    nx = -(-I // t.n)
    v, wv, bias, old, dz, d_old = top
    gated_x = (spec.rounds - 1) % 2 == 0  # odd rounds (counted from 1) gate x
    _kernels().gates_back_kernel[(-(-M // t.m), nx + -(-H // t.n))](
        dgates,
        w_ih,
        w_hh,
        dxh,
        v,
        wv,
        dxh if bias is None else bias,
        old,
        dz,
        d_old,
        M,
        I,
        H,
        G,
        nx,
        v.shape[1],
        dgates.stride(0),
        w_ih.stride(0),
        w_hh.stride(0),
        dxh.stride(0),
        *below_strides(v, wv, old, dz, d_old),
        **gates_back_constexprs(gated_x, bias is not None, precision(dgates.dtype), t),
        num_warps=chain_warps(dgates.dtype, t),
    )


def gates_cell(
    spec: DirectionSpec,
    xh: Tensor,
    wx: Tensor | None,
    wh: Tensor,
    bias: Tensor | None,
    pre: Tensor | None,
    c_prev: Tensor,
    gates: Tensor,
    c: Tensor,
    h: Tensor,
    peephole: tuple[Tensor, Tensor, Tensor] | None,
    next_h: Tensor | None = None,
    mask: Tensor | None = None,
) -> None:
    """``gates = act(xh @ [wx wh].T + bias + pre)`` (``wx`` None: ``xh @ wh.T``), ``c``,
    ``h`` of one step (``c_prev``, ``c``, ``h`` contiguous ``(B, H)``); and ``next_h =
    h * mask`` (``h`` without a mask), the state fed to the next step. The rest: unit
    column stride."""
    unit_columns(xh, wx, wh, pre, gates, next_h, mask)
    B = xh.shape[0]
    H = spec.hidden_size
    KX = 0 if wx is None else wx.shape[1]
    t = gates_tiles(B)
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    cx = gates_constexprs(
        variant_constexprs(spec),
        bias is not None,
        pre is not None,
        precision(xh.dtype),
        t,
        next_h is not None,
        next_h is not None and mask is not None,
    )
    _kernels().gates_cell_kernel[(-(-B // t.m), -(-H // t.n))](
        xh,
        wh if wx is None else wx,
        wh,
        # unused pointers: h, of the operand dtype (c is float32: another signature)
        h if bias is None else bias,
        h if pre is None else pre,
        c_prev,
        gates,
        c,
        h,
        h if next_h is None else next_h,
        h if mask is None else mask,
        h if p_i is None else p_i,
        h if p_f is None else p_f,
        h if p_o is None else p_o,
        B,
        H,
        KX,
        wh.shape[1],
        xh.stride(0),
        wh.stride(0) if wx is None else wx.stride(0),
        wh.stride(0),
        0 if pre is None else pre.stride(0),
        gates.stride(0),
        0 if next_h is None else next_h.stride(0),
        0 if mask is None else mask.stride(0),
        **cx,
        num_warps=warps(xh.dtype),
    )


def cell_backward(
    spec: DirectionSpec,
    gates: Tensor,
    c_prev: Tensor,
    c: Tensor,
    dh: Tensor,
    d_out: Tensor | None,
    dc: Tensor,
    peephole: tuple[Tensor, Tensor, Tensor] | None,
) -> None:
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
        dh if d_out is None else d_out,  # unused pointers: dh, of the operand dtype
        dc,
        dh if p_i is None else p_i,
        dh if p_f is None else p_f,
        dh if p_o is None else p_o,
        B,
        H,
        gates.stride(0),
        dh.stride(0),
        **cell_backward_constexprs(variant_constexprs(spec), d_out is not None),
    )


class TritonLoop(FusedBackend):
    """The step loop in Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def saved_shapes(self, spec: DirectionSpec, x: Tensor) -> list[tuple[int, ...]]:
        return [arena_shape(spec, x, cell_f32=CELL_F32)]

    def forward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, Tensor, Saved]:
        key = (str(x.device), x.dtype, precision(x.dtype))
        if key in ANNOUNCED or torch.compiler.is_compiling():
            with on_device(x):
                return self.graphed_forward(spec, x, h0, c0, mask, flat)
        ANNOUNCED.add(key)  # implementation="triton"'s first window ("auto" logs its check)
        name = str(x.dtype).removeprefix("torch.")
        logger.info("moglstm: compiling GPU kernels for %s, once; cached afterwards", name)
        start = time.perf_counter()
        with on_device(x):
            found = self.graphed_forward(spec, x, h0, c0, mask, flat)
        logger.info(
            "moglstm: first %s forward window in %.1f s (compiling included)",
            name,
            time.perf_counter() - start,
        )
        return found

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
        with on_device(x):
            return self.graphed_backward(spec, x, mask, flat, saved, d_out, d_hn, d_cn)

    def graphed_forward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, Tensor, Saved]:
        if not graphs.GRAPHS.applies(x):
            return self.eager_forward(spec, x, h0, c0, mask, flat)
        inputs = [x, h0, c0, mask, *flat]
        key = ("forward", spec, window_key(x), graphs.signature(inputs))

        def fn(a: list[Any]) -> list[Tensor]:  # a: x, h0, c0, mask, *flat; arena lent out
            out, h_n, c_n, (arena,) = self.eager_forward(spec, *a[:4], tuple(a[4:]))
            return [out, h_n, c_n, arena]

        out, h_n, c_n, arena = graphs.GRAPHS.run(key, inputs, fn, lend=(3,))
        return out, h_n, c_n, (arena,)

    def graphed_backward(
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
        # captured when the forward's window buffers are a forward graph's own (lent):
        # read in place, one graph per forward slot; after an eager forward (a shape's
        # first call, or every slot held) the backward is eager too
        found = graphs.GRAPHS.lender(saved[0]) if graphs.GRAPHS.applies(x) else None
        if found is None:
            return self.eager_backward(spec, x, mask, flat, saved, d_out, d_hn, d_cn)
        forward_inputs, lent = found
        n, s = len(flat), len(saved)
        # x and the weights: the forward graph's copies, read in place (equal to the saved
        # ones: autograd refuses a saved tensor changed in place; not replayed while held)
        x, flat = forward_inputs[0], tuple(forward_inputs[4:])
        saved = (lent, *saved[1:])
        inputs = [x, mask, *flat, *saved, d_out, d_hn, d_cn]
        key = ("backward", spec, window_key(x), graphs.signature(inputs), lent.data_ptr())
        # read in place: x, the weights, the window buffers. The key names only the
        # buffers' address; that suffices because this graph keeps them alive (no other
        # forward graph can get that address) and they, x and the weights belong to one
        # forward graph. (A stale entry thus also keeps that graph's x and weights alive.)
        fixed = (0, *range(2, 2 + n + 1))

        def fn(a: list[Any]) -> tuple[Any, ...]:  # a: x, mask, *flat, *saved, d_out, ...
            d_out, d_hn, d_cn = a[2 + n + s :]
            args = (tuple(a[2 : 2 + n]), tuple(a[2 + n : 2 + n + s]), d_out, d_hn, d_cn)
            return self.eager_backward(spec, a[0], a[1], *args)

        return graphs.GRAPHS.run(key, inputs, fn, fixed=fixed)

    def eager_forward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, Tensor, Saved]:
        """The forward with one launch after another (what a CUDA graph captures)."""
        d = Direction.from_flat(spec, [t.contiguous() for t in flat])  # kernels index rows densely
        buf, out = start_window(spec, x, c0, cell_f32=CELL_F32)  # c in float32, as cuDNN
        T, B, _ = x.shape
        w_ih = d.weight_ih if spec.rounds else None  # without rounds x's product is done
        pre = None
        if spec.rounds == 0:  # x is never gated: project all steps at once (cuBLAS)
            pre = torch.matmul(x, d.weight_ih.t())
            if d.gates_bias is not None:
                pre += d.gates_bias
        bias = d.gates_bias if spec.rounds else None
        rounds = [(r.left.contiguous(), r.right, r.bias) for r in d.rounds]
        slots = round_slots(spec.rounds)
        mask = None if mask is None else mask.contiguous()
        store_state(buf.hs[0][0], h0, mask)  # later steps' by the gates' kernel
        for t in range(T):
            for r, ((tgt, src), (left, right, b)) in enumerate(zip(slots, rounds, strict=True)):
                odd = r % 2 == 0  # rounds count from 1
                gated, gating = (buf.xs, buf.hs) if odd else (buf.hs, buf.xs)
                v, old, new = gating[src][t], gated[tgt][t], gated[tgt + 1][t]
                if right is not None and rank_tile(right.shape[0], x.dtype):  # one launch
                    two_products(v, right, left, buf.u[r][t], new, b, old, mode=ROUND_FORWARD)
                    continue
                if right is not None:
                    linear(v, right, buf.u[r][t])
                    v = buf.u[r][t]
                round_forward(v, left, b, old, new)
            xh = buf.xh[t] if spec.rounds else buf.hs[0][t]
            step_pre = None if pre is None else pre[t]
            gates_cell(
                spec,
                xh,
                w_ih,
                d.weight_hh,
                bias,
                step_pre,
                buf.c[t],
                buf.gates[t],
                buf.c[t + 1],
                out[t],
                d.peephole,
                buf.hs[0][t + 1] if t + 1 < T else None,
                mask,
            )
        return out, out[-1].clone(), in_dtype(buf.c[-1], x), (buf.arena,)

    def eager_backward(
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
        """The backward with one launch after another (what a CUDA graph captures)."""
        d = Direction.from_flat(spec, [t.contiguous() for t in flat])  # kernels index rows densely
        buf = Buffers(spec, x, *saved, cell_f32=CELL_F32)
        T, B, I = x.shape
        H = spec.hidden_size
        dh = fresh_grad(d_hn, buf.hs[0][0])
        dc = torch.zeros_like(buf.c[0])  # float32, as c
        if d_cn is not None:
            dc.copy_(d_cn)
        d_out = None if d_out is None else d_out.contiguous()
        dx_all = torch.empty_like(x) if spec.rounds else None
        dxh = x.new_empty(B, I + H if spec.rounds else H)  # one step's d[x_m, h_m] (or d h_m)
        rg = RoundGrads(spec, buf, B, chunk=T)  # one flush, after the loop: no allocations in it
        mask = None if mask is None else mask.contiguous()
        (steps,) = rg.chunks(T)
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
            if spec.rounds:
                self.rounds_back(spec, d, buf, t, dxh, rg, dx_all[t], mask)
                dh = dxh[:, I:]
            else:  # d h_{t-1} = dgates W_hh (times the mask) in one launch
                round_chain(buf.gates[t], d.weight_hh.t(), dxh, accumulate=False, mask=mask)
                dh = dxh
        rg.flush(steps)
        if dx_all is None:  # no rounds: the input's gradient in one product
            dx_all = buf.gates @ d.weight_ih
        grads = weight_grads(spec, buf, rg.grads, None, split=True)
        return dx_all, dh, dc if dc.dtype == x.dtype else in_dtype(dc, x), grads

    @staticmethod
    def rounds_back(
        spec: DirectionSpec,
        d: Direction,
        buf: Buffers,
        t: int,
        dxh: Tensor,
        rg: RoundGrads,
        dx_out: Tensor,
        mask: Tensor | None,
    ) -> None:
        """``d[x_m, h_m]`` and the rounds' backward of step ``t`` (``buf.gates[t]`` holds
        the gates' gradients): one launch for ``d[x_m, h_m]`` into ``dxh``, its half that
        the last round gated chained to that round's backward; then per round one
        product to its gating vector's gradient, chained to the backward of the round
        below (whose gated vector that is) or, for round 1, times the state mask.
        Gradients of gated vectors replace ``dxh``'s halves in place; round 1's d x
        goes to ``dx_out``, and ``d h_{t-1}`` ends in ``dxh[:, I:]``."""
        I = spec.input_size
        slots = round_slots(spec.rounds)
        grad = {True: dxh[:, :I], False: dxh[:, I:]}  # by "is it x's"

        def gate(r: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
            """Round ``r``'s backward operands ``(v, wv, bias, old, dz, d_old)``."""
            (tgt, src), odd = slots[r], r % 2 == 0  # odd rounds (from 1) gate x
            rw = d.rounds[r]
            old = buf.xs[tgt][t] if odd else buf.hs[tgt][t]
            v = buf.u[r][t] if spec.low_rank else (buf.hs[src][t] if odd else buf.xs[src][t])
            return v, rw.left, rw.bias, old, rg.dz[r][t], dx_out if r == 0 else grad[odd]

        # d[x_m, h_m], the last round's gated half chained to that round's backward
        gates_back(spec, buf.gates[t], d.weight_ih, d.weight_hh, dxh, gate(spec.rounds - 1))
        for r in reversed(range(spec.rounds)):
            rw, into = d.rounds[r], grad[r % 2 == 1]  # the gating vector's gradient
            below = gate(r - 1) if r else None
            last = {"mask": mask} if r == 0 else {"below": below}
            dz = rg.dz[r][t]
            if rw.right is None:
                round_chain(dz, rw.left.t(), into, **last)
            elif rank_tile(rw.right.shape[0], dz.dtype):  # du and the product in one launch
                round_chain(dz, rw.right.t(), into, w1=rw.left.t(), p=rg.du[r][t], **last)
            else:
                linear(dz, rw.left.t(), rg.du[r][t])
                round_chain(rg.du[r][t], rw.right.t(), into, **last)


TRITON = TritonLoop()


def in_dtype(t: Tensor, like: Tensor) -> Tensor:
    """A fresh copy of ``t`` in ``like``'s dtype (a device copy: no ``.to``, which a
    CUDA-graph check cannot tell from a copy from the host)."""
    return like.new_empty(t.shape).copy_(t)


def on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """``x``'s CUDA device made current: Triton launches on the current device's stream
    and a CUDA graph is captured and replayed there (a module on ``cuda:1`` while
    ``cuda:0`` is current would otherwise launch on the wrong device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def window_key(x: Tensor) -> tuple:
    """What a captured window depends on besides the spec and its inputs' shapes, dtypes
    and devices (:func:`graphs.signature`): the products' precision (TF32 or not) and
    the cuBLAS reduced-precision settings the products after the loop were captured with."""
    matmul = torch.backends.cuda.matmul
    reduced = (
        matmul.allow_fp16_reduced_precision_reduction,
        matmul.allow_bf16_reduced_precision_reduction,
    )
    return (precision(x.dtype), reduced, LOW_RANK_LAUNCHES)


def self_check_problem(
    device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, Tensor, tuple[Tensor, ...]]:
    """A small problem exercising rounds, low rank, peepholes, ragged sizes and state."""
    from moglstm.nn import MogrifierLSTM

    g = torch.Generator().manual_seed(0)
    # the first training step runs the check: its weights must not draw from the global
    # generator, or a resumed run's dropout masks would follow another stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = MogrifierLSTM(
            19, 37, num_layers=1, mogrify_rounds=5, mogrify_rank=7, implementation="reference"
        )
    x = torch.randn(3, 3, 19, generator=g)
    hx = tuple(torch.randn(1, 3, 37, generator=g) for _ in range(2))
    return ref.to(device, dtype), x.to(device, dtype), tuple(h.to(device, dtype) for h in hx)


def self_check(device: str, dtype: torch.dtype) -> bool:
    """Whether the Triton backend matches the reference on a small problem on ``device``
    (outputs and every gradient, relative error under 2e-2 for 16-bit dtypes, 1e-3 for
    float32; with CUDA-graph capture on, eagerly, captured and replayed); warns once on
    a mismatch or an error. Cached per device, dtype and precision (TF32 switched on
    after a float32 check is checked anew). Inside an outer CUDA-graph capture it cannot
    run (it reads values on the host): False, not cached. ``"auto"`` checks every
    configuration it runs instead (:mod:`moglstm.nn.backends.triton_check`); this small
    problem is for scripts (``benchmarks/gpu_check.py``)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return checked_problem(device, dtype, precision(dtype))


@functools.cache
def checked_problem(device: str, dtype: torch.dtype, prec: str) -> bool:
    """:func:`self_check`'s verdict, cached per precision ``prec`` (unused but as key)."""
    dev = torch.device(device)
    try:  # whatever the caller's mode (no_grad, inference, autocast): the check's own
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(dev.type, enabled=False),
        ):
            ref, x, hx = self_check_problem(dev, dtype)
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


def _run_both(
    ref: torch.nn.Module, x: Tensor, hx: tuple[Tensor, ...]
) -> list[tuple[Tensor, Tensor]]:
    """``(reference, triton)`` pairs of outputs and gradients; where windows are captured
    in CUDA graphs, for each of the three ways a call runs: eager (a key's first call),
    captured and replayed, and replayed."""
    from moglstm.nn.backends import REFERENCE

    runs = 3 if graphs.GRAPHS.applies(x) else 1
    want = _run(REFERENCE, ref, x, hx)
    return [pair for _ in range(runs) for pair in zip(want, _run(TRITON, ref, x, hx), strict=True)]


def _run(backend: Any, ref: torch.nn.Module, x: Tensor, hx: tuple[Tensor, ...]) -> list[Tensor]:
    from moglstm.nn.direction import Steps

    xs = x.clone().requires_grad_()
    h, c = (v[0].clone().requires_grad_() for v in hx)
    d = ref.direction(0, 0)
    out, hn, cn = backend.run(Steps(xs, None), h, c, d, False, None)
    params = list(ref.parameters())
    loss = (out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)).sum()
    loss = loss + hn.float().sum() * 2 - cn.float().sum()
    grads = torch.autograd.grad(loss, [xs, h, c, *params], allow_unused=True)
    return [out, hn, cn, *[g for g in grads if g is not None]]
