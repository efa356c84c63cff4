"""The Triton kernels of the Triton backend (imported only when triton is installed).

Four kernels make a step, all accumulating in float32 whatever the operand dtype:

* :func:`linear_kernel` -- ``z = a @ w.T (+ bias)`` for a ``(BM, BN)`` tile per program,
  with an epilogue chosen at compile time (``MODE``): store ``z`` (or add it to the
  output), a Mogrifier round's forward ``new = 2 sigmoid(z) old``, or its backward
  (``z`` recomputed: ``d_old = 2 s d_new`` and ``dz = 2 old d_new s (1 - s)``).
  ``w`` is read through its strides, so the transposed products of backward need no copy.
* :func:`two_product_kernel` -- a low-rank round's two products ``(a @ w1.T) @ w2.T`` in
  one launch, with the same epilogues (ranks up to 128).
* :func:`gates_cell_kernel` -- the gates' product on ``[x_m, h_m]`` for a tile of batch
  rows and hidden units (all four gate blocks of those units, so one program owns a
  complete cell update), fused with the cell update and every variant (coupled, capped
  input gate, peepholes). Writes the activated gates (for backward), ``c_t`` and ``h_t``.
* :func:`cell_backward_kernel` -- the cell update's backward, pointwise over ``(B, H)``:
  the pre-activation gate gradients overwrite the activations, ``dc`` becomes
  ``dc_{t-1}``.

Ranks, hidden and input sizes need not be powers of two or multiples of the tiles:
every load and store is masked (84 is padded to the 32-wide tile internally).
"""

from __future__ import annotations

import triton
import triton.language as tl

STORE, ROUND_FORWARD, ROUND_BACKWARD = 0, 1, 2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2 sigmoid(2x) - 1: exact limits at +-inf, no overflow to NaN
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def linear_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    old_ptr,
    dnew_ptr,
    dold_ptr,
    M,
    N,
    K,
    s_am,
    s_ak,
    s_wn,
    s_wk,
    s_om,
    s_oldm,
    s_dnm,
    s_dom,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
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
    _epilogue(
        acc,
        rm,
        rn,
        M,
        N,
        bias_ptr,
        out_ptr,
        old_ptr,
        dnew_ptr,
        dold_ptr,
        s_om,
        s_oldm,
        s_dnm,
        s_dom,
        MODE,
        HAS_BIAS,
        ACC,
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
    dnew_ptr,
    dold_ptr,
    s_om,
    s_oldm,
    s_dnm,
    s_dom,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """What a product tile ``acc`` (+ bias) becomes: see :func:`linear_kernel`."""
    m_ok = rm < M
    n_ok = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * s_om + rn[None, :]
    if MODE == 0:
        if ACC:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        s = _sigmoid(acc)
        old = tl.load(old_ptr + rm[:, None] * s_oldm + rn[None, :], mask=mask, other=0.0)
        tl.store(out_ptrs, (2.0 * s * old.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        s = _sigmoid(acc)
        old = tl.load(old_ptr + rm[:, None] * s_oldm + rn[None, :], mask=mask, other=0.0)
        d_new = tl.load(dnew_ptr + rm[:, None] * s_dnm + rn[None, :], mask=mask, other=0.0)
        d_new = d_new.to(tl.float32)
        dz = 2.0 * old.to(tl.float32) * d_new * s * (1.0 - s)
        # d_old may be d_new's own memory: every element is read above, before this store
        tl.store(
            dold_ptr + rm[:, None] * s_dom + rn[None, :],
            (2.0 * s * d_new).to(dold_ptr.dtype.element_ty),
            mask=mask,
        )
        tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=mask)


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
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    KP: tl.constexpr,
):
    """A low-rank round's two products in one launch: ``p = a @ w1.T`` (``(M, RANK)``, the
    rank padded to ``KP`` inside; written by the programs of the first column tile), then
    ``z = p @ w2.T`` with :func:`linear_kernel`'s epilogue (``MODE`` store/accumulate or
    round forward). Every column program recomputes its rows' ``p`` (``2 BM K RANK``
    multiply-adds, small beside the launch it saves); ``p`` enters the second product
    rounded to the operand dtype, exactly as the two-launch path reloads it."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, KP)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    r_ok = rr < RANK
    p = tl.zeros((BM, KP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            a_ptr + rm[:, None] * s_am + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        w1 = tl.load(
            w1_ptr + rr[None, :] * s_w1r + kk[:, None] * s_w1k,
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        p = tl.dot(a, w1, p, input_precision=PRECISION)
    p = p.to(p_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(p_ptr + rm[:, None] * s_pm + rr[None, :], p, mask=m_ok[:, None] & r_ok[None, :])
    w2 = tl.load(
        w2_ptr + rn[None, :] * s_w2n + rr[:, None] * s_w2r,
        mask=(rn < N)[None, :] & r_ok[:, None],
        other=0.0,
    )
    acc = tl.dot(p, w2, input_precision=PRECISION)
    _epilogue(
        acc,
        rm,
        rn,
        M,
        N,
        bias_ptr,
        out_ptr,
        old_ptr,
        out_ptr,
        out_ptr,
        s_om,
        s_oldm,
        s_om,
        s_om,
        MODE,
        HAS_BIAS,
        ACC,
    )


@triton.jit
def _gate_product(acc, a, w_ptr, rows, kk, s_w, ok, PRECISION: tl.constexpr):
    w = tl.load(w_ptr + rows[None, :] * s_w + kk[:, None], mask=ok, other=0.0)
    return tl.dot(a, w, acc, input_precision=PRECISION)


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
    w_ptr,
    bias_ptr,
    pre_ptr,
    c_prev_ptr,
    gates_ptr,
    c_ptr,
    h_ptr,
    pi_ptr,
    pf_ptr,
    po_ptr,
    B,
    H,
    K,
    s_xh,
    s_w,
    s_pre,
    s_g,
    COUPLED: tl.constexpr,
    CAP: tl.constexpr,
    PEEP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BB: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rb = pid_b * BB + tl.arange(0, BB)
    rj = pid_h * BH + tl.arange(0, BH)
    rk = tl.arange(0, BK)
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
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(
            xh_ptr + rb[:, None] * s_xh + kk[None, :],
            mask=b_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        ok = j_ok[None, :] & k_ok[:, None]
        if not COUPLED:
            acc_i = _gate_product(acc_i, a, w_ptr, row_i, kk, s_w, ok, PRECISION)
        acc_f = _gate_product(acc_f, a, w_ptr, row_f, kk, s_w, ok, PRECISION)
        acc_g = _gate_product(acc_g, a, w_ptr, row_g, kk, s_w, ok, PRECISION)
        acc_o = _gate_product(acc_o, a, w_ptr, row_o, kk, s_w, ok, PRECISION)
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
    tl.store(h_ptr + cell, (o * _tanh(c)).to(h_ptr.dtype.element_ty), mask=mask)


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
