"""The Triton kernels of the Triton backend (imported only when triton is installed).

Six kernels make a step, all accumulating in float32 whatever the operand dtype:

* :func:`linear_kernel` -- ``z = a @ w.T (+ bias)`` for a ``(BM, BN)`` tile per program,
  with an epilogue chosen at compile time (``MODE``): store ``z``, or a Mogrifier
  round's forward ``new = 2 sigmoid(z) old``. ``w`` is read through its strides, so the
  transposed products of backward need no copy.
* :func:`two_product_kernel` -- a low-rank round's two products ``(a @ w1.T) @ w2.T`` in
  one launch, with the same epilogues (ranks up to 128).
* :func:`round_chain_kernel` -- a round's backward product to its gating vector's
  gradient (one or, low rank, two products), accumulated, then either times the state
  mask or chained to the round below's backward (the epilogue above, its ``z``
  recomputed by a second product in the same program).
* :func:`gates_back_kernel` -- ``d[x_m, h_m] = dgates [W_ih W_hh]`` from the two weights
  as they are, the half the last round gated chained to that round's backward.
* :func:`gates_cell_kernel` -- the gates' product on ``[x_m, h_m]`` for a tile of batch
  rows and hidden units (all four gate blocks of those units, so one program owns a
  complete cell update), fused with the cell update and every variant (coupled, capped
  input gate, peepholes). Writes the activated gates (for backward), ``c_t`` and ``h_t``,
  and ``h_t`` times the state mask into the next step's slot.
* :func:`cell_backward_kernel` -- the cell update's backward, pointwise over ``(B, H)``:
  the pre-activation gate gradients overwrite the activations, ``dc`` becomes
  ``dc_{t-1}``.

Ranks, hidden and input sizes need not be powers of two or multiples of the tiles:
every load and store is masked (a rank of 84 is padded to the 128-wide rank tile).

Why one module of over 700 lines: about half of them are the kernels' signatures and
calls, one argument per line as the formatter lays them out (a kernel takes 20 to 40
pointers, sizes and strides); the kernels share their ``@triton.jit`` helpers (the masked
product loop, the epilogues, a round's backward), which a split would scatter.
"""

from __future__ import annotations

import triton
import triton.language as tl

STORE, ROUND_FORWARD = 0, 1


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: exact limits at +-inf, no overflow to NaN
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _dot_loop(
    acc,
    a_ptr,
    s_am,
    s_ak,
    w_ptr,
    s_wn,
    s_wk,
    rm,
    rn,
    M,
    N,
    K,
    PRECISION: tl.constexpr,
    BK: tl.constexpr,
):
    """``acc + a[rm, :] @ w[rn, :].T`` over ``K`` in steps of ``BK`` (masked)."""
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[None, :] * s_wn + kk[:, None] * s_wk,
            mask=n_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def linear_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    old_ptr,
    M,
    N,
    K,
    s_am,
    s_ak,
    s_wn,
    s_wk,
    s_om,
    s_oldm,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _dot_loop(acc, a_ptr, s_am, s_ak, w_ptr, s_wn, s_wk, rm, rn, M, N, K, PRECISION, BK)
    _epilogue(
        acc,
        rm,
        rn,
        M,
        N,
        bias_ptr,
        out_ptr,
        old_ptr,
        s_om,
        s_oldm,
        MODE,
        HAS_BIAS,
    )


@triton.jit
def _epilogue(
    acc,
    rm,
    rn,
    M,
    N,
    bias_ptr,
    out_ptr,
    old_ptr,
    s_om,
    s_oldm,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """What a product tile ``acc`` (+ bias) becomes: see :func:`linear_kernel`."""
    m_ok = rm < M
    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * s_om + rn[None, :]
    if MODE == 0:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        s = _sigmoid(acc)
        old = tl.load(old_ptr + rm[:, None] * s_oldm + rn[None, :], mask=mask, other=0.0)
        tl.store(out_ptrs, (2.0 * s * old.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _low_rank_product(
    acc,
    a_ptr,
    s_am,
    s_ak,
    w1_ptr,
    s_w1r,
    s_w1k,
    w2_ptr,
    s_w2n,
    s_w2r,
    p_ptr,
    s_pm,
    rm,
    rn,
    M,
    N,
    K,
    RANK,
    WRITE_P,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    KP: tl.constexpr,
):
    """``acc + (a @ w1.T) @ w2.T`` for the tile ``(rm, rn)``: ``p = a @ w1.T`` (``(M, RANK)``,
    the rank padded to ``KP``) computed whole by every program, rounded to ``p``'s dtype
    (as a stored ``p`` would be reloaded) and stored where ``WRITE_P`` (one column of
    programs)."""
    rr = tl.arange(0, KP)
    r_ok = rr < RANK
    p = tl.zeros((BM, KP), dtype=tl.float32)
    p = _dot_loop(p, a_ptr, s_am, s_ak, w1_ptr, s_w1r, s_w1k, rm, rr, M, RANK, K, PRECISION, BK)
    p = p.to(p_ptr.dtype.element_ty)
    if WRITE_P:
        tl.store(
            p_ptr + rm[:, None] * s_pm + rr[None, :], p, mask=(rm < M)[:, None] & r_ok[None, :]
        )
    w2 = tl.load(
        w2_ptr + rn[None, :] * s_w2n + rr[:, None] * s_w2r,
        mask=(rn < N)[None, :] & r_ok[:, None],
        other=0.0,
    )
    return tl.dot(p, w2, acc, input_precision=PRECISION)


@triton.jit
def two_product_kernel(
    a_ptr,
    w1_ptr,
    w2_ptr,
    p_ptr,
    bias_ptr,
    out_ptr,
    old_ptr,
    M,
    N,
    K,
    RANK,
    s_am,
    s_w1r,
    s_w1k,
    s_w2n,
    s_w2r,
    s_pm,
    s_om,
    s_oldm,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    KP: tl.constexpr,
):
    """A low-rank round's two products in one launch: ``p = a @ w1.T`` (``(M, RANK)``, the
    rank padded to ``KP`` inside; written by the programs of the first column tile), then
    ``z = p @ w2.T`` with :func:`linear_kernel`'s epilogue (``MODE`` store or
    round forward). Every column program recomputes its rows' ``p`` (``2 BM K KP``
    multiply-adds, the larger part of the launch: with one 64-row batch tile at K=1024
    and KP=128 about 17 MFLOP per program, some 3 us on one SM, against the one launch's
    latency it saves; docs/gpu.md weighs it); ``p`` enters the second product rounded to
    the operand dtype, exactly as the two-launch path reloads it."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _low_rank_product(
        acc, a_ptr, s_am, 1, w1_ptr, s_w1r, s_w1k, w2_ptr, s_w2n, s_w2r, p_ptr, s_pm,
        rm, rn, M, N, K, RANK, pid_n == 0, PRECISION, BM, BK, KP,
    )  # fmt: skip
    _epilogue(acc, rm, rn, M, N, bias_ptr, out_ptr, old_ptr, s_om, s_oldm, MODE, HAS_BIAS)


@triton.jit
def round_chain_kernel(
    a_ptr,
    w1_ptr,
    w2_ptr,
    p_ptr,
    out_ptr,
    mask_ptr,
    v_ptr,
    wv_ptr,
    bias_ptr,
    old_ptr,
    dz_ptr,
    dold_ptr,
    M,
    N,
    K,
    RANK,
    KV,
    s_am,
    s_ak,
    s_w1r,
    s_w1k,
    s_w2n,
    s_w2k,
    s_pm,
    s_om,
    s_mm,
    s_vm,
    s_vk,
    s_wvn,
    s_wvk,
    s_oldm,
    s_dzm,
    s_dom,
    TWO: tl.constexpr,
    ACC: tl.constexpr,
    MASK: tl.constexpr,
    CHAIN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    KP: tl.constexpr,
):
    """A round's gradient product back to its gating vector, ``out (+)= a @ w2.T`` (or,
    low rank in one launch (``TWO``), ``p = a @ w1.T`` written as :func:`two_product_kernel`
    does, then ``out (+)= p @ w2.T``), ended by one of:

    * ``MASK``: the sum times the state-dropout ``mask`` (the last product of a step);
    * ``CHAIN``: the backward of the round below, whose gated vector that gating vector
      is, and whose gradient the sum ``d_new`` now completes: its ``z = v @ wv.T + bias``
      recomputed, ``dz = 2 old d_new s (1 - s)`` and ``d_old = 2 s d_new`` written
      (``d_old`` may be ``out``'s memory; ``out`` itself is not written).

    Chaining saves a launch per round and per step: one program owns a tile of ``d_new``
    completely, so the round below needs nothing from another program."""
    pid_n = tl.program_id(1)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TWO:
        acc = _low_rank_product(
            acc, a_ptr, s_am, s_ak, w1_ptr, s_w1r, s_w1k, w2_ptr, s_w2n, s_w2k, p_ptr, s_pm,
            rm, rn, M, N, K, RANK, pid_n == 0, PRECISION, BM, BK, KP,
        )  # fmt: skip
    else:
        acc = _dot_loop(
            acc, a_ptr, s_am, s_ak, w2_ptr, s_w2n, s_w2k, rm, rn, M, N, K, PRECISION, BK
        )
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * s_om + rn[None, :]
    if ACC:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    if MASK:
        acc *= tl.load(mask_ptr + rm[:, None] * s_mm + rn[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    if CHAIN:
        _round_below(
            acc, rm, rn, M, N, v_ptr, s_vm, s_vk, wv_ptr, s_wvn, s_wvk, KV, bias_ptr,
            old_ptr, s_oldm, dz_ptr, s_dzm, dold_ptr, s_dom, HAS_BIAS, PRECISION, BM, BN,
            BK,
        )  # fmt: skip
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_below(
    d_new,
    rm,
    rn,
    M,
    N,
    v_ptr,
    s_vm,
    s_vk,
    wv_ptr,
    s_wvn,
    s_wvk,
    KV,
    bias_ptr,
    old_ptr,
    s_oldm,
    dz_ptr,
    s_dzm,
    dold_ptr,
    s_dom,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """A round's backward for the tile ``(rm, rn)`` of its gated vector's complete
    gradient ``d_new`` (float32): ``z = v @ wv.T + bias`` recomputed, ``s = sigmoid(z)``,
    ``dz = 2 old d_new s (1 - s)`` and ``d_old = 2 s d_new`` written."""
    n_ok = rn < N
    mask = (rm < M)[:, None] & n_ok[None, :]
    z = tl.zeros((BM, BN), dtype=tl.float32)
    z = _dot_loop(z, v_ptr, s_vm, s_vk, wv_ptr, s_wvn, s_wvk, rm, rn, M, N, KV, PRECISION, BK)
    if HAS_BIAS:
        z += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    s = _sigmoid(z)
    old = tl.load(old_ptr + rm[:, None] * s_oldm + rn[None, :], mask=mask, other=0.0)
    dz = 2.0 * old.to(tl.float32) * d_new * s * (1.0 - s)
    tl.store(dz_ptr + rm[:, None] * s_dzm + rn[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(
        dold_ptr + rm[:, None] * s_dom + rn[None, :],
        (2.0 * s * d_new).to(dold_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def gates_back_kernel(
    dg_ptr,
    wx_ptr,
    wh_ptr,
    dxh_ptr,
    v_ptr,
    wv_ptr,
    bias_ptr,
    old_ptr,
    dz_ptr,
    dold_ptr,
    M,
    I,
    H,
    G,
    NX,
    KV,
    s_dgm,
    s_wx,
    s_wh,
    s_dxhm,
    s_vm,
    s_vk,
    s_wvn,
    s_wvk,
    s_oldm,
    s_dzm,
    s_dom,
    GATED_X: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``d[x_m, h_m] = dgates [W_ih W_hh]`` without concatenating the weights: the first
    ``NX`` column programs make ``dx_m = dgates W_ih``, the others ``dh_m = dgates W_hh``
    (no tile spans both). The half the last round gated (``GATED_X``: x's) goes on to
    that round's backward (:func:`_round_below`, ``d_old`` possibly in place) instead of
    being stored, saving its launch; the other half is stored into ``dxh``."""
    pid_n = tl.program_id(1)
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    in_x = pid_n < NX
    if in_x:
        rn = pid_n * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _dot_loop(acc, dg_ptr, s_dgm, 1, wx_ptr, 1, s_wx, rm, rn, M, I, G, PRECISION, BK)
        N = I
        col = rn
    else:
        rn = (pid_n - NX) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _dot_loop(acc, dg_ptr, s_dgm, 1, wh_ptr, 1, s_wh, rm, rn, M, H, G, PRECISION, BK)
        N = H
        col = I + rn
    if in_x == GATED_X:
        _round_below(
            acc, rm, rn, M, N, v_ptr, s_vm, s_vk, wv_ptr, s_wvn, s_wvk, KV, bias_ptr,
            old_ptr, s_oldm, dz_ptr, s_dzm, dold_ptr, s_dom, HAS_BIAS, PRECISION, BM, BN,
            BK,
        )  # fmt: skip
    else:
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        out = dxh_ptr + rm[:, None] * s_dxhm + col[None, :]
        tl.store(out, acc.to(dxh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_product(acc, a, w_ptr, rows, kk, s_w, ok, PRECISION: tl.constexpr):
    w = tl.load(w_ptr + rows[None, :] * s_w + kk[:, None], mask=ok, other=0.0)
    return tl.dot(a, w, acc, input_precision=PRECISION)


@triton.jit
def _gates_products(
    acc_i,
    acc_f,
    acc_g,
    acc_o,
    a_ptr,
    s_am,
    rb,
    b_ok,
    w_ptr,
    s_w,
    K,
    row_i,
    row_f,
    row_g,
    row_o,
    j_ok,
    COUPLED: tl.constexpr,
    PRECISION: tl.constexpr,
    BK: tl.constexpr,
):
    """The four gate blocks' ``acc + a @ w[rows].T`` over ``K`` columns of ``a``."""
    rk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            a_ptr + rb[:, None] * s_am + kk[None, :],
            mask=b_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        ok = j_ok[None, :] & k_ok[:, None]
        if not COUPLED:
            acc_i = _gate_product(acc_i, a, w_ptr, row_i, kk, s_w, ok, PRECISION)
        acc_f = _gate_product(acc_f, a, w_ptr, row_f, kk, s_w, ok, PRECISION)
        acc_g = _gate_product(acc_g, a, w_ptr, row_g, kk, s_w, ok, PRECISION)
        acc_o = _gate_product(acc_o, a, w_ptr, row_o, kk, s_w, ok, PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _gate_pre(
    acc,
    rows,
    rb,
    b_ok,
    j_ok,
    bias_ptr,
    pre_ptr,
    s_pre,
    HAS_BIAS: tl.constexpr,
    HAS_PRE: tl.constexpr,
):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_PRE:
        pre = tl.load(
            pre_ptr + rb[:, None] * s_pre + rows[None, :],
            mask=b_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        acc += pre.to(tl.float32)
    return acc


@triton.jit
def gates_cell_kernel(
    xh_ptr,
    wx_ptr,
    wh_ptr,
    bias_ptr,
    pre_ptr,
    c_prev_ptr,
    gates_ptr,
    c_ptr,
    h_ptr,
    next_ptr,
    mask_ptr,
    pi_ptr,
    pf_ptr,
    po_ptr,
    B,
    H,
    KX,
    KH,
    s_xh,
    s_wx,
    s_wh,
    s_pre,
    s_g,
    s_next,
    s_mask,
    COUPLED: tl.constexpr,
    CAP: tl.constexpr,
    PEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PRE: tl.constexpr,
    NEXT: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rb = pid_b * BB + tl.arange(0, BB)
    rj = pid_h * BH + tl.arange(0, BH)
    b_ok = rb < B
    j_ok = rj < H
    # gate blocks of W's rows (and of the gates buffer's columns): i, f, g, o, or f, g, o
    first = 0 if COUPLED else 1
    row_i = rj
    row_f = first * H + rj
    row_g = (first + 1) * H + rj
    row_o = (first + 2) * H + rj
    acc_i = tl.zeros((BB, BH), dtype=tl.float32)
    acc_f = tl.zeros((BB, BH), dtype=tl.float32)
    acc_g = tl.zeros((BB, BH), dtype=tl.float32)
    acc_o = tl.zeros((BB, BH), dtype=tl.float32)
    # [x_m, h_m] [W_ih W_hh]^T as two reductions: the weights are never concatenated
    acc_i, acc_f, acc_g, acc_o = _gates_products(
        acc_i, acc_f, acc_g, acc_o, xh_ptr, s_xh, rb, b_ok, wx_ptr, s_wx, KX,
        row_i, row_f, row_g, row_o, j_ok, COUPLED, PRECISION, BK,
    )  # fmt: skip
    acc_i, acc_f, acc_g, acc_o = _gates_products(
        acc_i, acc_f, acc_g, acc_o, xh_ptr + KX, s_xh, rb, b_ok, wh_ptr, s_wh, KH,
        row_i, row_f, row_g, row_o, j_ok, COUPLED, PRECISION, BK,
    )  # fmt: skip
    zf = _gate_pre(acc_f, row_f, rb, b_ok, j_ok, bias_ptr, pre_ptr, s_pre, HAS_BIAS, HAS_PRE)
    zg = _gate_pre(acc_g, row_g, rb, b_ok, j_ok, bias_ptr, pre_ptr, s_pre, HAS_BIAS, HAS_PRE)
    zo = _gate_pre(acc_o, row_o, rb, b_ok, j_ok, bias_ptr, pre_ptr, s_pre, HAS_BIAS, HAS_PRE)
    mask = b_ok[:, None] & j_ok[None, :]
    cell = rb[:, None] * H + rj[None, :]
    c_prev = tl.load(c_prev_ptr + cell, mask=mask, other=0.0).to(tl.float32)
    if PEEP:
        zf += tl.load(pf_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :] * c_prev
    f = _sigmoid(zf)
    g = _tanh(zg)
    gate = gates_ptr + rb[:, None] * s_g
    kind = gates_ptr.dtype.element_ty
    if COUPLED:
        c = f * c_prev + (1.0 - f) * g
    else:
        zi = _gate_pre(acc_i, row_i, rb, b_ok, j_ok, bias_ptr, pre_ptr, s_pre, HAS_BIAS, HAS_PRE)
        if PEEP:
            zi += tl.load(pi_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :] * c_prev
        i = _sigmoid(zi)
        if CAP:
            c = f * c_prev + tl.minimum(1.0 - f, i) * g
        else:
            c = f * c_prev + i * g
        tl.store(gate + row_i[None, :], i.to(kind), mask=mask)
    if PEEP:
        zo += tl.load(po_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :] * c
    o = _sigmoid(zo)
    tl.store(gate + row_f[None, :], f.to(kind), mask=mask)
    tl.store(gate + row_g[None, :], g.to(kind), mask=mask)
    tl.store(gate + row_o[None, :], o.to(kind), mask=mask)
    tl.store(c_ptr + cell, c.to(c_ptr.dtype.element_ty), mask=mask)
    h = o * _tanh(c)
    tl.store(h_ptr + cell, h.to(h_ptr.dtype.element_ty), mask=mask)
    if NEXT:  # h fed to the next step (times the state-dropout mask), saving a launch
        h = h.to(h_ptr.dtype.element_ty).to(tl.float32)  # as a copy of h_t would be
        if MASK:
            h *= tl.load(mask_ptr + rb[:, None] * s_mask + rj[None, :], mask=mask, other=0.0).to(
                tl.float32
            )
        tl.store(
            next_ptr + rb[:, None] * s_next + rj[None, :],
            h.to(next_ptr.dtype.element_ty),
            mask=mask,
        )


@triton.jit
def cell_backward_kernel(
    gates_ptr,
    c_prev_ptr,
    c_ptr,
    dh_ptr,
    dout_ptr,
    dc_ptr,
    pi_ptr,
    pf_ptr,
    po_ptr,
    B,
    H,
    s_g,
    s_dh,
    COUPLED: tl.constexpr,
    CAP: tl.constexpr,
    PEEP: tl.constexpr,
    HAS_DOUT: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rb = pid_b * BB + tl.arange(0, BB)
    rj = pid_h * BH + tl.arange(0, BH)
    b_ok = rb < B
    j_ok = rj < H
    mask = b_ok[:, None] & j_ok[None, :]
    first = 0 if COUPLED else 1
    gate = gates_ptr + rb[:, None] * s_g
    col_i = rj[None, :]
    col_f = first * H + rj[None, :]
    col_g = (first + 1) * H + rj[None, :]
    col_o = (first + 2) * H + rj[None, :]
    f = tl.load(gate + col_f, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate + col_g, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(gate + col_o, mask=mask, other=0.0).to(tl.float32)
    cell = rb[:, None] * H + rj[None, :]
    c_prev = tl.load(c_prev_ptr + cell, mask=mask, other=0.0).to(tl.float32)
    tanh_c = _tanh(tl.load(c_ptr + cell, mask=mask, other=0.0).to(tl.float32))
    dh = tl.load(dh_ptr + rb[:, None] * s_dh + rj[None, :], mask=mask, other=0.0)
    dh = dh.to(tl.float32)
    if HAS_DOUT:
        dh += tl.load(dout_ptr + cell, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + cell, mask=mask, other=0.0).to(tl.float32)
    dc += dh * o * (1.0 - tanh_c * tanh_c)
    dz_o = dh * tanh_c * o * (1.0 - o)
    if PEEP:
        dc += dz_o * tl.load(po_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    kind = gates_ptr.dtype.element_ty
    if COUPLED:
        df = dc * (c_prev - g)
        dg = dc * (1.0 - f)
    else:
        i = tl.load(gate + col_i, mask=mask, other=0.0).to(tl.float32)
        if CAP:
            one_minus_f = 1.0 - f
            # d min(a, b): to the smaller one, split evenly on ties (as torch.minimum does)
            to_a = tl.where(one_minus_f < i, 1.0, tl.where(one_minus_f == i, 0.5, 0.0))
            dm = dc * g
            df = dc * c_prev - dm * to_a
            dz_i = dm * (1.0 - to_a) * i * (1.0 - i)
            dg = dc * tl.minimum(one_minus_f, i)
        else:
            df = dc * c_prev
            dz_i = dc * g * i * (1.0 - i)
            dg = dc * i
        tl.store(gate + col_i, dz_i.to(kind), mask=mask)
    dz_f = df * f * (1.0 - f)
    dz_g = dg * (1.0 - g * g)
    dc_prev = dc * f
    if PEEP:
        dc_prev += dz_f * tl.load(pf_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if not COUPLED:
            dc_prev += dz_i * tl.load(pi_ptr + rj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(gate + col_f, dz_f.to(kind), mask=mask)
    tl.store(gate + col_g, dz_g.to(kind), mask=mask)
    tl.store(gate + col_o, dz_o.to(kind), mask=mask)
    tl.store(dc_ptr + cell, dc_prev.to(dc_ptr.dtype.element_ty), mask=mask)
