"""Backends of a layer direction, and the one place that picks one.

=====================  ==========================================================
backend                runs
=====================  ==========================================================
``reference``          :mod:`moglstm.nn.functional` step by step under autograd
``torch-loop``         one autograd node; a Python step loop of torch ops (any device)
``torch-loop+c-kernels``  the same with the pointwise parts in C (CPU)
``compiled-loop``      one autograd node; the whole step loop in C (CPU, threads)
``triton``             one autograd node; the step loop in Triton kernels (CUDA)
=====================  ==========================================================

:func:`select` is called once per :class:`~moglstm.nn.MogrifierLSTM` call and its
backend runs every layer and direction of that call. The fused backends share the
contract of :class:`~moglstm.nn.backends.base.FusedBackend` (plain ``forward`` and
``backward`` entry points), so they are tested against the reference and against each
other in the same way.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from moglstm.nn import _kernels
from moglstm.nn.backends.base import Backend, FusedBackend, FusedDirection
from moglstm.nn.backends.compiled import CompiledLoop
from moglstm.nn.backends.op import LibraryOp
from moglstm.nn.backends.reference import Reference
from moglstm.nn.backends.scan import Scan
from moglstm.nn.backends.torch_loop import TorchLoop, TorchLoopKernels
from moglstm.nn.backends.triton import TRITON, unavailable_reason
from moglstm.nn.backends.triton_check import CheckedTriton
from moglstm.nn.direction import Steps

__all__ = [
    "IMPLEMENTATIONS",
    "INFERENCE_MIN_STEPS",
    "LOOP_DTYPES",
    "Backend",
    "FusedBackend",
    "FusedDirection",
    "CHECKED_TRITON",
    "TRITON",
    "select",
    "step_loop",
]

IMPLEMENTATIONS = ("auto", "fused", "reference", "triton")
INFERENCE_MIN_STEPS = 8  # "auto" runs inference through the compiled loop from this many steps
# what the step-loop backends take (the compiled loop: float32/float64; bfloat16 and float16,
# e.g. under autocast, run the torch-ops loop)
LOOP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

REFERENCE = Reference()
TORCH_LOOP = TorchLoop()
TORCH_LOOP_KERNELS = TorchLoopKernels()
COMPILED_LOOP = CompiledLoop()
STEP_LOOPS = (TORCH_LOOP, TORCH_LOOP_KERNELS, COMPILED_LOOP, TRITON)  # named in the custom op
LIBRARY_OP = LibraryOp()
TRITON_OP = LibraryOp("triton")  # "triton" under torch.compile and torch.export
SCAN = Scan()


# torch.jit.trace records the steps of one call: every implementation loops over the window
# in Python, so a traced module would run the traced number of steps on any input
TRACE_REFUSED = (
    "MogrifierLSTM cannot be traced by torch.jit.trace or exported by the TorchScript-based "
    "ONNX exporter (torch.onnx.export(..., dynamo=False)): the trace would fix the window at "
    "{} steps and silently truncate longer inputs. Use torch.export.export(..., "
    "dynamic_shapes=...), torch.onnx.export(..., dynamo=True) (the default) or torch.compile, "
    "which keep the window length symbolic (docs/interop.md)"
)


def step_loop(x: torch.Tensor) -> FusedBackend:
    """The fastest step-loop backend for tensors like ``x`` (float32/float64)."""
    if _kernels.loop_available(x):
        return COMPILED_LOOP
    if _kernels.available(x):
        return TORCH_LOOP_KERNELS
    return TORCH_LOOP


# "auto"'s Triton backend on CUDA: every configuration checked on its first window
CHECKED_TRITON = CheckedTriton(step_loop)


def traced_backend(implementation: str) -> Backend | None:
    """The backend under a tracer, or None when running eagerly.

    ``torch.export`` (and the ONNX exporter, which uses it): ``"auto"`` runs the scan
    backend, a portable graph with a symbolic window length; ``"fused"`` the custom op
    (the exported program then needs moglstm to run), except for the ONNX exporter,
    which gets the scan loop too. ``torch.compile``: the custom op,
    one graph node whatever the window length. ``torch.func`` transforms and forward-mode
    AD (dual tensors): ``"auto"`` and ``"fused"`` run the reference, which every transform
    supports.
    ``torch.jit.trace`` (and the TorchScript-based ONNX exporter): refused by :func:`select`.
    """
    if torch.compiler.is_compiling():  # Dynamo, or torch.export
        # ONNX has no custom op for the step loop: the ONNX exporter gets the scan loop
        onnx = torch.onnx.is_in_onnx_export()
        if torch.compiler.is_exporting() and (implementation == "auto" or onnx):
            return SCAN
        return LIBRARY_OP
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        # every implementation: a fused node's backward would recompute with the reference
        # anyway (functorch runs backward with grad mode on), torch.func.vjp/jacrev run it
        # after the transform's level has closed, where the recompute cannot record, and
        # the step loops have no forward-mode derivative (dual tensors, torch.func.jvp)
        return REFERENCE
    return None


def select(implementation: str, steps: Steps, records_grad: bool, proj_size: int = 0) -> Backend:
    """The backend for one call.

    ``"reference"`` is the reference. ``"fused"`` is the best step loop for the input
    (an error for packed sequences, ``proj_size`` or other dtypes). ``"triton"`` is the
    Triton backend (an error where it cannot run: no triton, not CUDA and not
    ``TRITON_INTERPRET=1``, packed sequences, ``proj_size``, dtypes other than
    float32/float16/bfloat16). ``"auto"`` takes a fused backend when autograd records the
    call (training): on CUDA the Triton one, each layer direction's kernel configuration
    once it has passed its check on its first window (else the torch-ops loop;
    :mod:`~moglstm.nn.backends.triton_check`), on CPU the best step loop. Without
    autograd (inference, generation) it does so only for windows of at least
    ``INFERENCE_MIN_STEPS`` steps, on CUDA with Triton or on CPU with the compiled loop
    (measured on CPU: as fast at batch 1, twice as fast at batch 8, B=64 forward x1.2 of
    torch's LSTM against x1.8); the reference loop is faster for the few steps of a
    generation call and allocates no buffers. Packed sequences, other dtypes and
    ``proj_size`` run the reference; so does an empty batch (nothing to compute), on any
    implementation. Under a tracer see :func:`traced_backend`; ``"triton"`` runs there as
    the custom op around the Triton backend.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if torch.jit.is_tracing():
        raise RuntimeError(TRACE_REFUSED.format(steps.length))
    if implementation == "reference" or (steps.batch_sizes is None and not steps.x.shape[1]):
        return REFERENCE
    x = steps.x
    if implementation == "triton":
        reason = "packed sequences" if steps.batch_sizes is not None else None
        reason = reason or ("proj_size" if proj_size else unavailable_reason(x))
        if reason:
            raise ValueError(f"implementation='triton' does not support {reason}")
        return TRITON_OP if torch.compiler.is_compiling() else TRITON
    reason = None
    if steps.batch_sizes is not None:
        reason = "packed sequences"
    elif proj_size:
        reason = "proj_size"
    elif x.dtype not in LOOP_DTYPES:
        reason = f"dtype {x.dtype}"
    if reason and implementation == "fused":
        raise ValueError(f"implementation='fused' does not support {reason}; use 'auto'")
    if reason:
        return REFERENCE
    traced = traced_backend(implementation)
    if traced is not None:
        return traced
    backend = CHECKED_TRITON if _triton_ready(x) else step_loop(x)
    if implementation == "auto" and not records_grad:
        # inference: a fused backend pays for its setup (weights concatenated and packed,
        # buffers) over a window; the reference loop wins on a few steps
        fast = backend is COMPILED_LOOP or backend is CHECKED_TRITON
        if steps.length < INFERENCE_MIN_STEPS or not fast:
            return REFERENCE
    return backend


def _triton_ready(x: torch.Tensor) -> bool:
    """Whether "auto" and "fused" run tensors like ``x`` through Triton: on CUDA, where it
    can run and its first check on that device did not crash; each configuration is then
    checked against the torch path on its first window (:class:`CheckedTriton`)."""
    if x.device.type != "cuda" or unavailable_reason(x) is not None:
        return False
    return CHECKED_TRITON.device_usable(x.device)
