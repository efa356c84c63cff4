"""Where and how a run computes: the device, mixed precision, and the random state.

Training, evaluation, generation and the distributed wrapper all resolve a device and
an autocast dtype here, and a checkpoint captures and restores every random number
generator through here. Imports torch and nothing else of moglstm but the error types.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.errors import UserError
from moglstm.lm.safety import short_repr

__all__ = [
    "DEVICE_HELP",
    "autocast",
    "autocast_dtype",
    "capture_rng_state",
    "fix_cpu_threads",
    "is_device_spec",
    "resolve_device",
    "restore_rng_state",
]

#: The device settings ``train.device`` (and ``--device``) take.
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def is_device_spec(spec: str) -> bool:
    """Whether ``spec`` is spelled like a device setting (see :data:`DEVICE_HELP`)."""
    return _DEVICE_RE.fullmatch(spec) is not None


# --------------------------------------------------------------------------- CPU threads


def fix_cpu_threads(threads: int | None = None) -> int:
    """Fix the CPU thread count for the rest of the process; return it.

    Same command, same machine, same bits: every sum that torch, its BLAS (MKL on x86)
    or moglstm's compiled step loop splits over threads is cut by the thread count, so
    the count must not move during a run. It is set explicitly (``threads``, or torch's
    default: one per physical core) and the thread libraries' dynamic adjustment is
    turned off (``MKL_DYNAMIC``, on by default until ``torch.set_num_threads`` is called,
    lets MKL take fewer threads than asked; ``OMP_DYNAMIC`` lets OpenMP do the same
    when the machine is busy). A different count gives results that differ in the last
    bits; see docs/reproducibility.md.
    """
    n = threads if threads is not None else torch.get_num_threads()
    torch.set_num_threads(n)  # with MKL, also mkl_set_dynamic(0)
    for symbol in ("MKL_Set_Dynamic", "omp_set_dynamic"):
        fn = _torch_symbol(symbol)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], None
            fn(0)
    return n


@functools.cache
def _torch_library() -> ctypes.CDLL | None:
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            try:
                return ctypes.CDLL(str(lib_dir / name))  # already loaded: the same handle
            except OSError:
                return None
    return None


def _torch_symbol(name: str) -> Any:
    """A C function of torch's CPU library or of what it links (MKL, OpenMP), or None."""
    lib = _torch_library()
    return None if lib is None else getattr(lib, name, None)


# --------------------------------------------------------------------------- devices


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a device setting into a :class:`torch.device`, checking it exists.

    Args:
        spec: ``"auto"`` (CUDA if available, else MPS, else CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Raises:
        ValueError: ``spec`` is malformed or names a device this machine lacks.
    """
    if not isinstance(spec, str):
        raise TypeError(f"device: expected a string, got {spec!r}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"device={spec!r} is not one of: {DEVICE_HELP}") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={spec!r} but CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise UserError(f"device={spec!r} but only {count} CUDA device(s) are available")
    elif device.type == "mps":
        if not _mps_available():
            raise UserError(f"device={spec!r} but MPS is not available on this machine")
    elif device.type != "cpu":
        raise UserError(f"device={spec!r} is not one of: {DEVICE_HELP}")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The mixed-precision dtype to use on ``device``, or ``None`` for full precision.

    Mixed precision is used only on CUDA: bfloat16 where the GPU supports it, else
    float16 (which then needs a gradient scaler when training).
    """
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Return the state of every random number generator a run draws from, as plain data.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without
        CUDA), "mps": ByteTensor or None, "python": {"version", "state",
        "gauss_next"}, "numpy": {...} or None}``: tensors, lists and numbers only,
        so it can go into a checkpoint.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if _mps_available() else None,
        "python": _python_state(),
        "numpy": _numpy_state(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every generator back to a state returned by :func:`capture_rng_state`.

    CUDA states are restored for the devices present (a warning says when the
    device count differs, e.g. a GPU run resumed on CPU); MPS and NumPy states
    are restored when those are available.

    Args:
        state: the dict from :func:`capture_rng_state` (possibly via a checkpoint).

    Raises:
        ValueError: ``state`` is not shaped like :func:`capture_rng_state`'s result
            (the key is named).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
    for key in ("torch", "python"):
        if key not in state:
            raise UserError(f"rng state: missing key {key!r} (have {short_repr(list(state))})")
    torch.set_rng_state(_byte_tensor(state["torch"], "torch"))
    _restore_cuda(state.get("cuda") or [])
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(_byte_tensor(state["mps"], "mps"))
    _restore_python(state["python"])
    if state.get("numpy") is not None:
        _restore_numpy(state["numpy"])


def _byte_tensor(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise UserError(f"rng state[{key!r}]: expected a uint8 tensor, got {short_repr(value)}")
    return value.cpu()  # the setters want CPU byte tensors, whatever map_location did


def _restore_cuda(states: list) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if states and len(states) != available:
        warnings.warn(
            f"checkpoint holds CUDA RNG states for {len(states)} device(s) but {available} "
            "are available; restoring those present, so random draws may differ",
            stacklevel=3,
        )
    for device, s in enumerate(states[:available]):
        torch.cuda.set_rng_state(_byte_tensor(s, f"cuda[{device}]"), device)


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _restore_python(d: Any) -> None:
    try:
        random.setstate((d["version"], tuple(d["state"]), d["gauss_next"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"rng state['python'] is malformed: {short_repr(exc)}") from exc


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:  # numpy is optional; nothing to capture without it
        return None
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _restore_numpy(d: Any) -> None:
    try:
        import numpy as np
    except ImportError:
        warnings.warn("checkpoint holds a NumPy RNG state but NumPy is not installed", stacklevel=3)
        return
    try:
        key = np.asarray(d["key"], dtype=np.uint32)
        np.random.set_state((d["kind"], key, d["pos"], d["has_gauss"], d["cached_gaussian"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"rng state['numpy'] is malformed: {short_repr(exc)}") from exc
