"""Fused pointwise CPU kernels for the fused path, in C, built on first use.

Each LSTM or Mogrifier-round step otherwise costs about ten small torch ops on
``(B, H)`` tensors, each one pass over memory with its own dispatch; on CPU that
is most of the fused path's time beyond the matrix products. These kernels do
one pass each. They are plain C (no torch headers, so they build in about a
second with the system C compiler), called through ctypes on raw pointers, and
cached by a hash of source and flags under ``$MOGLSTM_KERNEL_CACHE`` or
``~/.cache/moglstm/kernels``. Without a C compiler, or with
``MOGLSTM_NO_KERNELS=1``, the fused path uses its torch-op formulation, which
the tests check gives the same results.

``tanh`` is written as ``2 sigmoid(2x) - 1`` so the loops need only ``exp`` and
vectorise (``-O3 -ffast-math`` with glibc's vector math).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch import Tensor

_TEMPLATE = r"""
#include <math.h>
#include <stdint.h>
/* exp's argument is clamped to +-LIM (exp(LIM) stays finite): under -ffast-math the division
   may become a reciprocal estimate and a Newton step, which turns 1 / inf into NaN. The clamp
   changes nothing visible: sigmoid is below 1e-34 there. NaN still propagates. */
#define CLAMP(x) ((x) < -LIM ? -LIM : ((x) > LIM ? LIM : (x)))
#define SIG(x) ((T)1 / ((T)1 + EXP(-CLAMP(x))))
#define TANH(x) ((T)2 * SIG((T)2 * (x)) - (T)1)

/* The variant flags are compile-time constants in each call of these bodies, so every
   variant gets its own branch-free loop that vectorises. */
#define INL static inline __attribute__((always_inline))
#define R_ __restrict__

/* gates: (B, G*H) pre-activations in, activations out; G = 3 (f, g, o) if coupled */
INL void lstm_fwd_body_NAME(int64_t B, int64_t H, T *R_ gates, const T *R_ c_prev, T *R_ c,
                            T *R_ h, const T *R_ pi, const T *R_ pf, const T *R_ po,
                            const int COUPLED, const int CAP, const int PEEP) {
    const int64_t G = COUPLED ? 3 : 4;
    for (int64_t b = 0; b < B; b++) {
        T *R_ zi = gates + b * G * H;
        T *R_ zf = zi + (COUPLED ? 0 : H);
        T *R_ zg = zf + H;
        T *R_ zo = zg + H;
        const T *R_ cp = c_prev + b * H;
        T *R_ cn = c + b * H;
        T *R_ hn = h + b * H;
#pragma GCC ivdep
        for (int64_t j = 0; j < H; j++) {
            T f = SIG(zf[j] + (PEEP ? pf[j] * cp[j] : (T)0));
            T g = TANH(zg[j]);
            T m;
            if (COUPLED) {
                m = (T)1 - f;
            } else {
                T i = SIG(zi[j] + (PEEP ? pi[j] * cp[j] : (T)0));
                m = CAP ? ((T)1 - f < i ? (T)1 - f : i) : i;
                zi[j] = i;
            }
            T cv = f * cp[j] + m * g;
            T o = SIG(zo[j] + (PEEP ? po[j] * cv : (T)0));
            zf[j] = f; zg[j] = g; zo[j] = o;
            cn[j] = cv;
            hn[j] = o * TANH(cv);
        }
    }
}

void lstm_fwd_NAME(int64_t B, int64_t H, T *gates, const T *c_prev, T *c, T *h,
                   const T *pi, const T *pf, const T *po, int coupled, int cap) {
    int peep = pf != 0;
#define CALL(C, K, P) lstm_fwd_body_NAME(B, H, gates, c_prev, c, h, pi, pf, po, C, K, P)
    if (coupled) { if (peep) CALL(1, 0, 1); else CALL(1, 0, 0); }
    else if (cap) { if (peep) CALL(0, 1, 1); else CALL(0, 1, 0); }
    else { if (peep) CALL(0, 0, 1); else CALL(0, 0, 0); }
#undef CALL
}

/* gates: activations in, pre-activation gradients out; dc: dc_t in, dc_{t-1} out;
   tanh(c_t) is recomputed from c_t rather than stored */
INL void lstm_bwd_body_NAME(int64_t B, int64_t H, T *R_ gates, const T *R_ c_prev,
                            const T *R_ c_new, const T *R_ dh, T *R_ dc, const T *R_ pi,
                            const T *R_ pf, const T *R_ po,
                            const int COUPLED, const int CAP, const int PEEP) {
    const int64_t G = COUPLED ? 3 : 4;
    for (int64_t b = 0; b < B; b++) {
        T *R_ ai = gates + b * G * H;
        T *R_ af = ai + (COUPLED ? 0 : H);
        T *R_ ag = af + H;
        T *R_ ao = ag + H;
        const T *R_ cp = c_prev + b * H;
        const T *R_ cn = c_new + b * H;
        const T *R_ dhb = dh + b * H;
        T *R_ dcb = dc + b * H;
#pragma GCC ivdep
        for (int64_t j = 0; j < H; j++) {
            T o = ao[j], t = TANH(cn[j]), f = af[j], g = ag[j], d = dhb[j];
            T dzo = d * t * o * ((T)1 - o);
            T dcn = dcb[j] + d * o * ((T)1 - t * t) + (PEEP ? dzo * po[j] : (T)0);
            T df, dg, dzi = (T)0;
            if (COUPLED) {
                df = dcn * (cp[j] - g);
                dg = dcn * ((T)1 - f);
            } else {
                T i = ai[j];
                if (CAP) {
                    T a = (T)1 - f;
                    /* d min(a, i): to the smaller, split evenly on ties (as torch) */
                    T to_a = a < i ? (T)1 : (a == i ? (T)0.5 : (T)0);
                    T dm = dcn * g;
                    df = dcn * cp[j] - dm * to_a;
                    dzi = dm * ((T)1 - to_a) * i * ((T)1 - i);
                    dg = dcn * (a < i ? a : i);
                } else {
                    df = dcn * cp[j];
                    dzi = dcn * g * i * ((T)1 - i);
                    dg = dcn * i;
                }
                ai[j] = dzi;
            }
            T dzf = df * f * ((T)1 - f);
            af[j] = dzf;
            ag[j] = dg * ((T)1 - g * g);
            ao[j] = dzo;
            dcb[j] = dcn * f + (PEEP ? dzf * pf[j] : (T)0)
                     + ((PEEP && !COUPLED) ? dzi * pi[j] : (T)0);
        }
    }
}

void lstm_bwd_NAME(int64_t B, int64_t H, T *gates, const T *c_prev, const T *c_new,
                   const T *dh, T *dc, const T *pi, const T *pf, const T *po,
                   int coupled, int cap) {
    int peep = pf != 0;
#define CALL(C, K, P) lstm_bwd_body_NAME(B, H, gates, c_prev, c_new, dh, dc, pi, pf, po, C, K, P)
    if (coupled) { if (peep) CALL(1, 0, 1); else CALL(1, 0, 0); }
    else if (cap) { if (peep) CALL(0, 1, 1); else CALL(0, 1, 0); }
    else { if (peep) CALL(0, 0, 1); else CALL(0, 0, 0); }
#undef CALL
}

/* s: (R, C) pre-activation in, sigmoid out; new = 2 s old (row strides so, sn) */
void round_fwd_NAME(int64_t R, int64_t C, T *R_ s, const T *R_ old, int64_t so, T *R_ nw,
                    int64_t sn) {
    for (int64_t r = 0; r < R; r++) {
        T *sr = s + r * C;
        const T *orow = old + r * so;
        T *nrow = nw + r * sn;
        for (int64_t j = 0; j < C; j++) {
            T v = SIG(sr[j]);
            sr[j] = v;
            nrow[j] = (T)2 * v * orow[j];
        }
    }
}

/* s: pre-activation z in, dz out; with v = sigmoid(z): d_old = 2 v d_new */
void round_bwd_NAME(int64_t R, int64_t C, T *R_ s, const T *R_ old, int64_t so,
                    const T *R_ dnew, int64_t sd, T *R_ dold) {
    for (int64_t r = 0; r < R; r++) {
        T *sr = s + r * C, *dor = dold + r * C;
        const T *orow = old + r * so, *drow = dnew + r * sd;
        for (int64_t j = 0; j < C; j++) {
            T v = SIG(sr[j]), dn = drow[j];
            dor[j] = (T)2 * v * dn;
            sr[j] = (T)2 * orow[j] * dn * v * ((T)1 - v);
        }
    }
}
"""

# -ffast-math only when compiling: linking with it adds crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads (and would change every float
# computation in it, torch's included).
_FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC"]
_LINK_FLAGS = ["-shared", "-fPIC"]


def _source() -> str:
    parts = []
    for name, ctype, exp, lim in (
        ("f32", "float", "expf", "80.0f"),
        ("f64", "double", "exp", "700.0"),
    ):
        body = _TEMPLATE.replace("NAME", name)
        head = f"#define T {ctype}\n#define EXP {exp}\n#define LIM {lim}\n"
        parts.append(f"{head}{body}\n#undef T\n#undef EXP\n#undef LIM\n")
    return "".join(parts)


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc.split()[0]
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MOGLSTM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "moglstm" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native builds differ between CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    source = _source()
    parts = [source, cc, *_FLAGS, *_LINK_FLAGS, platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\n".join(parts).encode())
    target = _cache_dir() / f"pointwise-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "pointwise.c"
        src.write_text(source)
        obj, out = Path(tmp) / "pointwise.o", Path(tmp) / "pointwise.so"
        run = {"check": True, "capture_output": True, "timeout": 120}
        subprocess.run([cc, *_FLAGS, "-c", str(src), "-o", str(obj)], **run)
        subprocess.run([cc, *_LINK_FLAGS, str(obj), "-o", str(out), "-lm"], **run)
        os.replace(out, target)  # atomic: a concurrent build gives the same file
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` when disabled or no compiler works (cached)."""
    if os.environ.get("MOGLSTM_NO_KERNELS", "") not in ("", "0"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        return ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError):
        return None


def available(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _SUFFIX and load() is not None


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _arg(a):
    """ctypes argument: tensors (or None) by data pointer, bools as int, ints as int64."""
    if a is None or isinstance(a, Tensor):
        assert a is None or a.stride(-1) == 1, "kernels need rows with unit stride"
        return ctypes.c_void_p(None if a is None else a.data_ptr())
    return ctypes.c_int(a) if isinstance(a, bool) else ctypes.c_int64(a)


def _call(name: str, ref: Tensor, *args) -> None:
    getattr(load(), f"{name}_{_SUFFIX[ref.dtype]}")(*map(_arg, args))


def _contiguous(*ts: Tensor | None) -> None:
    for t in ts:
        assert t is None or t.is_contiguous(), "kernels need contiguous buffers"


def lstm_forward(gates, c_prev, c, h, peephole, coupled: bool, cap: bool) -> None:
    """In place: activate ``gates`` (B, G*H); write ``c`` and ``h`` (B, H)."""
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    _contiguous(gates, c_prev, c, h, p_i, p_f, p_o)
    B, H = c.shape
    _call("lstm_fwd", c, B, H, gates, c_prev, c, h, p_i, p_f, p_o, coupled, cap)


def lstm_backward(gates, c_prev, c, dh, dc, peephole, coupled: bool, cap: bool) -> None:
    """In place: ``gates`` activations -> pre-activation grads; ``dc`` -> ``dc_{t-1}``.
    ``c`` is ``c_t``, from which ``tanh(c_t)`` is recomputed."""
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    _contiguous(gates, c_prev, c, dh, dc, p_i, p_f, p_o)
    B, H = dc.shape
    _call("lstm_bwd", dc, B, H, gates, c_prev, c, dh, dc, p_i, p_f, p_o, coupled, cap)


def round_forward(s: Tensor, old: Tensor, new: Tensor) -> None:
    """In place: ``s = sigmoid(s)``, ``new = 2 * s * old`` (rows of old/new may be strided)."""
    _contiguous(s)
    R, C = s.shape
    _call("round_fwd", s, R, C, s, old, old.stride(0), new, new.stride(0))


def round_backward(z: Tensor, old: Tensor, d_new: Tensor, d_old: Tensor) -> None:
    """In place, with ``s = sigmoid(z)``: ``d_old = 2 s d_new``; ``z`` becomes
    ``dz = 2 old d_new s (1 - s)``."""
    _contiguous(z, d_old)
    R, C = z.shape
    _call("round_bwd", z, R, C, z, old, old.stride(0), d_new, d_new.stride(0), d_old)
