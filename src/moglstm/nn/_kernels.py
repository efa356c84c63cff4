"""The fused path's compiled CPU code: pointwise kernels and the step loop, in C.

Each LSTM or Mogrifier-round step costs about ten small torch ops on ``(B, H)``
tensors, each one pass over memory with its own dispatch, and each step of the
window about thirty of them plus their Python; on CPU that is most of the
fused path's time beyond the matrix products. ``csrc/`` holds plain C for both:

* pointwise kernels (LSTM cell forward/backward, Mogrifier round forward/backward),
  one pass each, which the Python step loop of :mod:`moglstm.nn.backends.torch_loop` calls;
* the step loop itself (``mog_forward`` / ``mog_backward``): every step of a
  window, its matrix products through the BLAS inside ``libtorch_cpu`` (MKL on
  x86 builds of torch; single precision with MKL's packed weights) and the
  kernels. :func:`run_rows` runs it on ``torch.get_num_threads()`` threads, each
  making one-thread BLAS calls: the rounds of a step on its share of the batch
  rows (independent sequences), the gates on its share of the hidden units (so
  each thread reads only its part of the gates' weights), with a spin barrier
  between the phases.

The C needs no torch headers, so it builds in about a second with the system C
compiler, on first use, and is cached by a hash of source and flags under
``$MOGLSTM_KERNEL_CACHE`` or ``~/.cache/moglstm/kernels``. Without a compiler,
with ``MOGLSTM_NO_KERNELS=1``, or when torch's BLAS entry points are not found
(or fail a small self-check), the fused path falls back to its Python step loop
and torch ops; the tests check every combination against the reference path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_CSRC = Path(__file__).parent / "csrc"
_FILES = ("moglstm.c", "body.h")

# -ffast-math only when compiling: linking with it adds crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads (and would change every float
# computation in it, torch's included).
_FLAGS = ["-O3", "-ffast-math", "-march=native", "-fPIC"]
_LINK_FLAGS = ["-shared", "-fPIC"]


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
    sources = {name: (_CSRC / name).read_text() for name in _FILES}
    parts = [*sources.values(), cc, *_FLAGS, *_LINK_FLAGS, platform.machine(), _cpu_flags()]
    key = hashlib.sha256("\n".join(parts).encode())
    target = _cache_dir() / f"moglstm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        for name, text in sources.items():
            (Path(tmp) / name).write_text(text)
        src, obj, out = (Path(tmp) / n for n in ("moglstm.c", "moglstm.o", "moglstm.so"))
        # no timeout: which step loop runs (and so the last bits of every result) must not
        # depend on how busy the machine is while it compiles
        run = {"check": True, "capture_output": True}
        subprocess.run([cc, *_FLAGS, "-c", str(src), "-o", str(obj)], **run)
        subprocess.run([cc, *_LINK_FLAGS, str(obj), "-o", str(out), "-lm"], **run)
        os.replace(out, target)  # atomic: a concurrent build gives the same file
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` when disabled or no compiler works (cached).

    Every entry point gets its ``argtypes``/``restype``, and the structs Python builds
    are checked against the C side's layout (:func:`check_layout`): a library that
    disagrees is refused with an error, never called.
    """
    if os.environ.get("MOGLSTM_NO_KERNELS", "") not in ("", "0"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        lines = detail.strip().splitlines()
        warnings.warn(
            f"moglstm: the C kernels could not be built with {cc} ({lines[-1] if lines else exc}); "
            "the fused path runs its slower Python step loop, whose results differ from the "
            "compiled loop's in the last bits",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _declare(lib)
    check_layout(lib)
    return lib


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every entry point (``csrc/body.h``, ``moglstm.c``)."""
    layer, entry = ctypes.POINTER(Layer), ctypes.POINTER(Blas)
    signatures = {
        "lstm_fwd": ([_I64] * 3 + [_P] * 7 + [_INT, _INT, _P], None),
        "lstm_bwd": ([_I64] * 3 + [_P] * 8 + [_INT, _INT], None),
        "round_fwd": ([_I64, _I64, _P, _P, _P, _I64, _P, _I64], None),
        "round_bwd": ([_I64, _I64, _P, _P, _P, _I64, _P, _I64, _P, _I64], None),
        "mog_forward": ([layer, entry] + [_I64] * 4, _INT),
        "mog_backward": ([layer, entry] + [_I64] * 6, _INT),
        "blas_check": ([entry], _INT),
    }
    for name, (args, result) in signatures.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, result
    layout = lib.mog_struct_layout
    layout.argtypes = [
        _I64,
        ctypes.POINTER(_I64),
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(_I64),
        _I64,
    ]
    layout.restype = _I64


def struct_layout(lib: ctypes.CDLL, which: int) -> tuple[int, list[tuple[str, int]]]:
    """``(size, [(field, offset), ...])`` of C struct ``which`` (0: Layer, 1: Blas)."""
    cap = 64
    size, names, offsets = _I64(), (ctypes.c_char_p * cap)(), (_I64 * cap)()
    n = lib.mog_struct_layout(which, ctypes.byref(size), names, offsets, cap)
    if not 0 <= n <= cap:
        raise RuntimeError(f"moglstm's C library reports {n} fields for struct {which}")
    return size.value, [(names[i].decode(), offsets[i]) for i in range(n)]


def check_layout(lib: ctypes.CDLL) -> None:
    """Raise if the ctypes mirrors :class:`Layer` and :class:`Blas` differ from the C
    structs in size, field names or field offsets (an internal bug: the two sides of
    the boundary were edited apart)."""
    for which, mirror in enumerate((Layer, Blas)):
        size, c_fields = struct_layout(lib, which)
        ours = [(name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
        if size != ctypes.sizeof(mirror) or c_fields != ours:
            raise RuntimeError(
                f"moglstm's C struct {mirror.__name__} (size {size}, fields {c_fields}) does "
                f"not match its ctypes mirror (size {ctypes.sizeof(mirror)}, fields {ours})"
            )


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def available(t: Tensor) -> bool:
    """Whether the pointwise kernels serve tensors like ``t``."""
    return t.device.type == "cpu" and t.dtype in _SUFFIX and load() is not None


def loop_available(t: Tensor) -> bool:
    """Whether the compiled step loop serves tensors like ``t``."""
    return available(t) and blas() is not None


class Blas(ctypes.Structure):
    """Entry points of the BLAS linked into torch (``Blas`` in ``csrc/moglstm.c``)."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("sgemm", "dgemm", "pack_size", "pack", "compute", "set_threads_local")
    ]


_BLAS_SYMBOLS = {
    "sgemm": "sgemm_",
    "dgemm": "dgemm_",
    "pack_size": "cblas_sgemm_pack_get_size",
    "pack": "cblas_sgemm_pack",
    "compute": "cblas_sgemm_compute",
    "set_threads_local": "MKL_Set_Num_Threads_Local",
}


def _torch_library() -> ctypes.CDLL | None:
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            try:
                return ctypes.CDLL(str(lib_dir / name))  # already loaded: the same handle
            except OSError:
                return None
    return None


@functools.cache
def blas() -> Blas | None:
    """torch's BLAS entry points if both gemms are there and pass the self-check (cached)."""
    lib, torch_lib = load(), _torch_library()
    if lib is None or torch_lib is None:
        return None
    found = {}
    for field, symbol in _BLAS_SYMBOLS.items():
        try:
            found[field] = ctypes.cast(getattr(torch_lib, symbol), ctypes.c_void_p).value
        except AttributeError:
            found[field] = None
    if found["sgemm"] is None or found["dgemm"] is None:
        return None
    entry = Blas(**found)
    checks = (lib.blas_check_f32(ctypes.byref(entry)), lib.blas_check_f64(ctypes.byref(entry)))
    return entry if all(checks) else None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ptrs(ctype: Any, values: Sequence) -> ctypes.Array:
    return (ctype * max(1, len(values)))(*values)


def _row_stride(name: str, t: Tensor) -> int:
    """The row stride ``ld`` of a ``(T, B, n)`` buffer whose element ``(t, b, j)`` sits at
    ``(t * B + b) * ld + j`` (strides of size-1 dimensions do not matter)."""
    T, B, n = t.shape
    ld = t.stride(1) if B > 1 else (t.stride(0) if T > 1 else max(t.stride(0), t.stride(1), n))
    if (T > 1 and t.stride(0) != B * ld) or (n > 1 and t.stride(2) != 1):
        raise ValueError(f"{name}: the C loop needs steps after each other, rows of unit stride")
    return ld


def _check_contiguous(**tensors: Tensor | None) -> None:
    """C code indexes these as dense arrays: refuse anything else (memory safety)."""
    for name, t in tensors.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for moglstm's C kernels")


def _check_rows(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs rows of unit stride for moglstm's C kernels")


class Layer(ctypes.Structure):
    """One layer direction for the step loop (``Layer`` in ``csrc/moglstm.c``).

    Build it with :meth:`make`, which also keeps every tensor it points into alive.
    """

    _fields_ = [
        *((n, ctypes.c_int64) for n in ("steps", "B", "I", "H", "G")),
        *((n, ctypes.c_int64) for n in ("rounds", "low_rank", "coupled", "cap")),
        ("rank", ctypes.POINTER(ctypes.c_int64)),
        *((n, ctypes.POINTER(ctypes.c_void_p)) for n in ("w_left", "w_right", "w_bias")),
        *((n, ctypes.c_void_p) for n in ("w_gates", "bias", "peep_i", "peep_f", "peep_o")),
        ("xs", ctypes.POINTER(ctypes.c_void_p)),
        ("xs_ld", ctypes.POINTER(ctypes.c_int64)),
        ("hs", ctypes.POINTER(ctypes.c_void_p)),
        ("hs_ld", ctypes.POINTER(ctypes.c_int64)),
        ("u", ctypes.POINTER(ctypes.c_void_p)),
        *((n, ctypes.c_void_p) for n in ("gates", "c", "out", "h0", "mask")),
        *((n, ctypes.c_void_p) for n in ("d_out", "dh", "dc", "dx")),
        *((n, ctypes.POINTER(ctypes.c_void_p)) for n in ("gw_left", "gw_right", "gw_bias")),
        *((n, ctypes.c_void_p) for n in ("g_bias", "work", "sync")),
    ]

    @classmethod
    def make(cls, tensors: dict, flags: dict, lists: dict) -> Layer:
        """``tensors``: name -> tensor or None (contiguous); ``lists``: name -> list of
        tensors or None (rows of unit stride; xs/hs versions may have any row stride);
        ``flags``: the integer fields. The row strides of the versions and the rounds'
        ranks (the widths of the ``u`` buffers) are read off the tensors."""
        layer = cls(**flags)
        keep = [*tensors.values(), *(t for ts in lists.values() for t in ts)]
        _check_contiguous(**tensors)
        for name, t in tensors.items():
            setattr(layer, name, _ptr(t))
        for name, ts in lists.items():
            if name not in ("xs", "hs"):  # versions of x and h may have strided rows
                _check_contiguous(**{f"{name}[{i}]": t for i, t in enumerate(ts)})
            array = _ptrs(ctypes.c_void_p, [_ptr(t) for t in ts])
            keep.append(array)
            setattr(layer, name, ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p)))
            if name in ("xs", "hs"):
                lds = _ptrs(ctypes.c_int64, [_row_stride(name, t) for t in ts])
                keep.append(lds)
                setattr(layer, f"{name}_ld", ctypes.cast(lds, ctypes.POINTER(ctypes.c_int64)))
        ranks = _ptrs(ctypes.c_int64, [u.shape[-1] for u in lists.get("u", [])])
        keep.append(ranks)
        layer.rank = ctypes.cast(ranks, ctypes.POINTER(ctypes.c_int64))
        layer._keep = keep  # the memory behind every pointer lives as long as the struct
        return layer


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def advise_huge_pages(t: Tensor) -> None:
    """Ask Linux to back the 2 MiB-aligned part of ``t``'s memory with transparent huge
    pages (call before first touching it); harmless where unsupported."""
    madvise = _madvise()
    start, size = t.data_ptr(), t.numel() * t.element_size()
    lo, hi = -(-start // _HUGE_PAGE) * _HUGE_PAGE, (start + size) // _HUGE_PAGE * _HUGE_PAGE
    if madvise is not None and hi > lo:
        madvise(lo, hi - lo, _MADV_HUGEPAGE)  # a refusal (EINVAL) changes nothing


def row_slices(batch: int) -> list[tuple[int, int]]:
    """The batch rows each thread of the step loop takes for the rounds: near-equal
    contiguous ranges, one per ``torch.get_num_threads()`` thread (at most one per row)."""
    n = max(1, min(torch.get_num_threads(), batch))
    bounds = [batch * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def run_rows(
    name: str, layer: Layer, dtype: torch.dtype, slices: list[tuple[int, int]], *extra: int
) -> None:
    """Run ``name`` (``mog_forward`` or ``mog_backward``) with one thread per range of batch
    rows in ``slices`` (ctypes releases the GIL during each call). Thread ``i`` gets its
    rows, its index (its slice of the gradient accumulators) and the thread count; the C
    shares out hidden units and columns itself and synchronises the threads after each
    phase of a step through ``layer.sync``."""
    fn = getattr(load(), f"{name}_{_SUFFIX[dtype]}")
    entry = blas()
    status = [0] * len(slices)
    sync = torch.zeros(4, dtype=torch.int32)  # the barrier's counter, sense and error flag
    layer.sync, layer._sync = sync.data_ptr(), sync

    def work(i: int) -> None:
        b0, b1 = slices[i]
        ints = (b0, b1, i, len(slices), *extra)
        status[i] = fn(ctypes.byref(layer), ctypes.byref(entry), *ints)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, len(slices))]
    started = []
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
    except RuntimeError:  # could not start a thread: the started ones must not wait for it
        sync[3] = 1
        for thread in started:
            thread.join()
        raise
    work(0)
    for thread in threads:
        thread.join()
    if any(status):
        raise MemoryError(f"the compiled step loop ({name}) could not allocate its workspace")


def _call(name: str, ref: Tensor, *args: Any) -> None:
    """Call kernel ``name`` for ``ref``'s dtype; tensors go by data pointer."""
    fn = getattr(load(), f"{name}_{_SUFFIX[ref.dtype]}")
    fn(*(a.data_ptr() if isinstance(a, Tensor) else a for a in args))


def lstm_forward(
    gates: Tensor,
    c_prev: Tensor,
    c: Tensor,
    h: Tensor,
    peephole: tuple[Tensor, Tensor, Tensor] | None,
    coupled: bool,
    cap: bool,
) -> None:
    """In place: activate ``gates`` (B, G*H); write ``c`` and ``h`` (B, H)."""
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    _check_contiguous(gates=gates, c_prev=c_prev, c=c, h=h, p_i=p_i, p_f=p_f, p_o=p_o)
    B, H = c.shape
    _call("lstm_fwd", c, B, H, H, gates, c_prev, c, h, p_i, p_f, p_o, coupled, cap, None)


def lstm_backward(
    gates: Tensor,
    c_prev: Tensor,
    c: Tensor,
    dh: Tensor,
    dc: Tensor,
    peephole: tuple[Tensor, Tensor, Tensor] | None,
    coupled: bool,
    cap: bool,
) -> None:
    """In place: ``gates`` activations -> pre-activation grads; ``dc`` -> ``dc_{t-1}``.
    ``c`` is ``c_t``, from which ``tanh(c_t)`` is recomputed."""
    p_i, p_f, p_o = peephole if peephole is not None else (None, None, None)
    _check_contiguous(gates=gates, c_prev=c_prev, c=c, dh=dh, dc=dc, p_i=p_i, p_f=p_f, p_o=p_o)
    B, H = dc.shape
    _call("lstm_bwd", dc, B, H, H, gates, c_prev, c, dh, dc, p_i, p_f, p_o, coupled, cap)


def round_forward(s: Tensor, old: Tensor, new: Tensor) -> None:
    """In place: ``s = sigmoid(s)``, ``new = 2 * s * old`` (rows of old/new may be strided)."""
    _check_contiguous(s=s)
    _check_rows(old=old, new=new)
    R, C = s.shape
    _call("round_fwd", s, R, C, s, None, old, old.stride(0), new, new.stride(0))


def round_backward(z: Tensor, old: Tensor, d_new: Tensor, d_old: Tensor) -> None:
    """In place, with ``s = sigmoid(z)``: ``d_old = 2 s d_new``; ``z`` becomes
    ``dz = 2 old d_new s (1 - s)``."""
    _check_contiguous(z=z)
    _check_rows(old=old, d_new=d_new, d_old=d_old)
    R, C = z.shape
    args = (R, C, z, None, old, old.stride(0), d_new, d_new.stride(0), d_old, d_old.stride(0))
    _call("round_bwd", z, *args)
