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
#define SIG(x) ((T)1 / ((T)1 + EXP(-(x))))
#define TANH(x) ((T)2 * SIG((T)2 * (x)) - (T)1)

/* gates: (B, G*H) pre-activations in, activations out; G = 3 (f, g, o) if coupled */
void lstm_fwd_NAME(int64_t B, int64_t H, T *gates, const T *c_prev, T *c, T *h,
                   const T *pi, const T *pf, const T *po, int coupled, int cap) {
    const int64_t G = coupled ? 3 : 4;
    for (int64_t b = 0; b < B; b++) {
        T *zi = gates + b * G * H, *zf = zi + (coupled ? 0 : H), *zg = zf + H, *zo = zg + H;
        const T *cp = c_prev + b * H;
        T *cn = c + b * H, *hn = h + b * H;
        for (int64_t j = 0; j < H; j++) {
            T f_in = zf[j] + (pf ? pf[j] * cp[j] : (T)0);
            T f = SIG(f_in), g = TANH(zg[j]), i = (T)0, m;
            if (coupled) {
                m = (T)1 - f;
            } else {
                i = SIG(zi[j] + (pi ? pi[j] * cp[j] : (T)0));
                m = cap ? fmin((T)1 - f, i) : i;
            }
            T cv = f * cp[j] + m * g;
            T o = SIG(zo[j] + (po ? po[j] * cv : (T)0));
            T t = TANH(cv);
            if (!coupled) zi[j] = i;
            zf[j] = f; zg[j] = g; zo[j] = o;
            cn[j] = cv; hn[j] = o * t;
        }
    }
}

/* gates: activations in, pre-activation gradients out; dc: dc_t in, dc_{t-1} out;
   tanh(c_t) is recomputed from c_t rather than stored */
void lstm_bwd_NAME(int64_t B, int64_t H, T *gates, const T *c_prev, const T *c_new,
                   const T *dh, T *dc, const T *pi, const T *pf, const T *po,
                   int coupled, int cap) {
    const int64_t G = coupled ? 3 : 4;
    for (int64_t b = 0; b < B; b++) {
        T *ai = gates + b * G * H, *af = ai + (coupled ? 0 : H), *ag = af + H, *ao = ag + H;
        const T *cp = c_prev + b * H, *cn = c_new + b * H, *dhb = dh + b * H;
        T *dcb = dc + b * H;
        for (int64_t j = 0; j < H; j++) {
            T o = ao[j], t = TANH(cn[j]), f = af[j], g = ag[j], d = dhb[j];
            T dzo = d * t * o * ((T)1 - o);
            T dcn = dcb[j] + d * o * ((T)1 - t * t) + (po ? dzo * po[j] : (T)0);
            T df, dg, dzi = (T)0, i = (T)0;
            if (coupled) {
                df = dcn * (cp[j] - g);
                dg = dcn * ((T)1 - f);
            } else {
                i = ai[j];
                if (cap) {
                    T a = (T)1 - f;
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
            }
            T dzf = df * f * ((T)1 - f);
            T dzg = dg * ((T)1 - g * g);
            T dcp = dcn * f + (pf ? dzf * pf[j] : (T)0) + (pi && !coupled ? dzi * pi[j] : (T)0);
            if (!coupled) ai[j] = dzi;
            af[j] = dzf; ag[j] = dzg; ao[j] = dzo;
            dcb[j] = dcp;
        }
    }
}

/* s: (R, C) pre-activation in, sigmoid out; new = 2 s old (row strides so, sn) */
void round_fwd_NAME(int64_t R, int64_t C, T *s, const T *old, int64_t so, T *nw, int64_t sn) {
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
void round_bwd_NAME(int64_t R, int64_t C, T *s, const T *old, int64_t so, const T *dnew,
                    int64_t sd, T *dold) {
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

_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only", "-march=native", "-shared", "-fPIC"]


def _source() -> str:
    parts = []
    for name, ctype, exp in (("f32", "float", "expf"), ("f64", "double", "exp")):
        body = _TEMPLATE.replace("NAME", name)
        parts.append(f"#define T {ctype}\n#define EXP {exp}\n{body}\n#undef T\n#undef EXP\n")
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
    parts = [source, cc, *_FLAGS, platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\n".join(parts).encode())
    target = _cache_dir() / f"pointwise-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "pointwise.c"
        src.write_text(source)
        out = Path(tmp) / "pointwise.so"
        subprocess.run(
            [cc, *_FLAGS, str(src), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
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
