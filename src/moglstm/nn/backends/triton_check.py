"""Every Triton binary is checked before it trains: ``implementation="auto"`` on CUDA.

A *configuration* is what decides which binaries a layer direction's window runs
(:class:`Config`): the operand dtype, the products' precision (TF32 or IEEE float32),
the batch tile (and with it the warps), each round's launch mode and rank tile, the
variant flags, the state mask, and what Triton specialises a launch on: sizes divisible
by 16 or equal to 1, pointers 16-byte aligned. The first window of each new
configuration on a device is computed twice more before it is trusted: by the torch-ops
loop in the same dtype and in float64; the Triton window (outputs, final state, every
gradient for a fixed cotangent) must be as close to float64 as the torch path's error
allows (:func:`compare_window`). A mismatch or an error warns once, naming the
configuration and the error, and that configuration runs the torch-ops loop from then
on (other configurations keep Triton). The verdicts are cached per configuration, so
switching TF32 on after a float32 check checks the TF32 binaries anew.

The first check on a device runs in a child process (``python -m
moglstm.nn.backends.triton_child``) on a problem of the same configuration: a crash or
an illegal memory access there (which would leave this process's CUDA context broken)
becomes a warning and the torch-ops loop on that device; a pass has filled Triton's
on-disk cache, so this process compiles nothing for it. Inside an outer CUDA-graph
capture no check can run (it reads values on the host): the call runs the torch-ops
loop and the check waits for a later call; nothing is cached as failed. So under a
tracer or a ``torch.func`` transform (``"fused"`` reaches here under ``torch.func``).

Compilation is reported through the ``logging`` logger of this module at INFO level
(``moglstm``'s command line shows it): what is being compiled, and how long it took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moglstm.nn.backends import triton as tb
from moglstm.nn.backends.base import Backend, FusedBackend, Saved
from moglstm.nn.direction import Direction, DirectionSpec, Steps

logger = logging.getLogger(__name__)

# floors of the relative error to float64 a Triton window may have whatever the torch
# path's own error: rounding of the operands alone (IEEE float32, TF32, 16-bit)
FLOORS = {"ieee-float32": 1e-4, "tf32-float32": 5e-3}
FLOOR_16BIT = 2e-2
SLACK = 4.0  # and it may be this many times the torch-ops loop's error in the same dtype,
CAP = 0.1  # but never more than this (a torch path that far off says nothing)
# a child compiles one configuration's ~14 binaries (seconds each) and runs 2 steps
CHILD_TIMEOUT_S = float(os.environ.get("MOGLSTM_TRITON_CHILD_TIMEOUT", "300"))
# the first check on a device in a child process: on CUDA ("auto"), never, or always
# (MOGLSTM_TRITON_CHILD_CHECK=0/1; 1 on CPU too, for tests under the interpreter)
CHILD_CHECK = os.environ.get("MOGLSTM_TRITON_CHILD_CHECK", "auto")
CHILD_COMMAND = [sys.executable, "-m", "moglstm.nn.backends.triton_child"]


def _specialised(n: int) -> tuple[bool, bool]:
    """What Triton specialises an integer argument on: divisible by 16, equal to 1."""
    return (n % 16 == 0, n == 1)


def _aligned(t: Tensor | None) -> bool:
    return t is None or t.data_ptr() % 16 == 0


@dataclass(frozen=True)
class Config:
    """What picks the binaries of a layer direction's window (see the module docstring)."""

    device: str
    dtype: str
    precision: str
    batch_tile: int
    rounds: tuple[str, ...]  # per round: "full", "low-rank/<tile>" (one launch), "low-rank/2"
    variant: tuple[bool, ...]  # coupled, cap_input_gate, peephole, bias, round_bias
    state_mask: bool
    sizes: tuple[tuple[bool, bool], ...]  # B, I, H, each rank: (divisible by 16, == 1)
    aligned: tuple[bool, ...]  # x, h0, c0, mask, weights: 16-byte aligned

    def __str__(self) -> str:
        names = ("coupled", "cap_input_gate", "peephole", "bias", "round_bias")
        flags = [n for n, on in zip(names, self.variant, strict=True) if on]
        return (
            f"{self.dtype} ({self.precision}) on {self.device}, batch tile {self.batch_tile}, "
            f"rounds [{', '.join(self.rounds)}], variant [{', '.join(flags)}], "
            f"state mask {self.state_mask}, sizes%16/==1 {self.sizes}, aligned {self.aligned}"
        )


def config_of(
    spec: DirectionSpec, x: Tensor, h: Tensor, c: Tensor, mask: Tensor | None, flat: list
) -> Config:
    dtype = x.dtype
    rounds = []
    for k in spec.ranks:
        tile = None if k is None else tb.rank_tile(k, dtype)
        rounds.append("full" if k is None else f"low-rank/{tile}" if tile else "low-rank/2")
    ranks = [k for k in spec.ranks if k is not None]
    B = x.shape[1]
    flags = (spec.coupled, spec.cap_input_gate, spec.peephole, spec.bias, spec.round_bias)
    return Config(
        device=str(x.device),
        dtype=str(dtype).removeprefix("torch."),
        precision=f"{tb.precision(dtype)}-float32" if dtype == torch.float32 else "16-bit",
        batch_tile=tb.batch_tile(B),
        rounds=tuple(rounds),
        variant=flags,
        state_mask=mask is not None,
        sizes=tuple(_specialised(n) for n in (B, spec.input_size, spec.hidden_size, *ranks)),
        aligned=tuple(_aligned(t) for t in (x, h, c, mask, *flat)),
    )


class EagerTriton(FusedBackend):
    """The Triton backend with one launch after another (no CUDA graph): what a check
    runs, so that it neither captures nor holds a graph's buffers."""

    name = "triton"

    def saved_shapes(self, spec: DirectionSpec, x: Tensor) -> list[tuple[int, ...]]:
        return tb.TRITON.saved_shapes(spec, x)

    def forward(self, spec, x, h0, c0, mask, flat):  # noqa: ANN001, ANN201 (FusedBackend's)
        with tb.on_device(x):
            return tb.TRITON.eager_forward(spec, x, h0, c0, mask, flat)

    def backward(self, spec, x, mask, flat, saved: Saved, d_out, d_hn, d_cn):  # noqa: ANN001, ANN201
        with tb.on_device(x):
            return tb.TRITON.eager_backward(spec, x, mask, flat, saved, d_out, d_hn, d_cn)


EAGER_TRITON = EagerTriton()


def _window(
    backend: Backend,
    spec: DirectionSpec,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
    reverse: bool,
    dtype: torch.dtype,
) -> list[Tensor]:
    """Outputs and the gradients of x, h, c and every weight of one window in ``dtype``,
    for a fixed cotangent; the inputs are read in place where ``dtype`` is theirs (the
    same pointers, so the same binaries, as the caller's window)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, h, c, *flat)]
    xs, h0, c0, *weights = leaves
    m = None if mask is None else mask.detach().to(dtype)
    d = Direction.from_flat(spec, weights)
    out, hn, cn = backend.run(Steps(xs, None), h0, c0, d, reverse, m)
    g = torch.Generator(device=x.device).manual_seed(0)  # not the global RNG stream
    cotangent = torch.randn(out.shape, generator=g, device=x.device, dtype=torch.float32)
    loss = (out.float() * cotangent).sum() + hn.float().sum() * 0.5 - cn.float().sum() * 0.25
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads, strict=True)]
    return [out, hn, cn, *grads]


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_context(device_type: str) -> contextlib.ExitStack:
    """Whatever the caller's mode (no_grad, inference, autocast): the check's own."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def compare_window(
    spec: DirectionSpec,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
    reverse: bool = False,
    triton_backend: Backend = EAGER_TRITON,
) -> tuple[bool, str]:
    """``(passed, what)``: the Triton window against the torch-ops loop in float64 (the
    truth) and in the window's dtype (the error the torch path itself makes). It passes
    when every output and gradient is finite and its relative error to float64 is at most
    ``max(floor, min(SLACK * the torch path's, CAP))``; ``what`` gives the worst error."""
    from moglstm.nn.backends.torch_loop import TorchLoop

    torch_loop = TorchLoop()
    args = (spec, x, h, c, mask, flat, reverse)
    with check_context(x.device.type):
        got = _window(triton_backend, *args, x.dtype)
        truth = _window(torch_loop, *args, torch.float64)
        same = _window(torch_loop, *args, x.dtype)
    if not all(bool(torch.isfinite(t).all()) for t in got):
        return False, "non-finite values in the Triton window"
    names = ["output", "h_n", "c_n", "d x", "d h0", "d c0"]
    names += [f"d weight {i}" for i in range(len(flat))]
    floor = FLOORS[f"{tb.precision(x.dtype)}-float32"] if x.dtype == torch.float32 else FLOOR_16BIT
    worst, what = 0.0, ""
    for name, a, want, base in zip(names, got, truth, same, strict=True):
        err, allowed = _rel(a, want), max(floor, min(SLACK * _rel(base, want), CAP))
        if err / allowed > worst:
            worst, what = err / allowed, f"{name}: relative error {err:.2e}, allowed {allowed:.2e}"
    return worst <= 1.0, what


# -- the first check on a device, in a child process


def child_wanted(device: torch.device) -> bool:
    if CHILD_CHECK in ("0", "1"):
        return CHILD_CHECK == "1"
    return device.type == "cuda"


def child_request(spec: DirectionSpec, x: Tensor, mask: Tensor | None, reverse: bool) -> dict:
    """What the child needs to rebuild a problem of the same configuration: sizes, the
    variant, dtype, precision, the state mask; 2 steps (step 0's pointers 16-byte
    aligned, step 1's as aligned as any later step's)."""
    return {
        "spec": spec.encode(),
        "steps": min(int(x.shape[0]), 2),
        "batch": int(x.shape[1]),
        "dtype": str(x.dtype).removeprefix("torch."),
        "tf32": tb.tf32_allowed(),
        "mask": mask is not None,
        "reverse": reverse,
        "device": str(x.device),
    }


def run_child(request: dict, timeout_s: float | None = None) -> tuple[str, str]:
    """``(verdict, what)`` of the check in a child process: ``"pass"``, ``"mismatch"``
    or ``"fault"`` (it crashed, was killed by a signal, or ran past ``timeout_s``).
    The child runs in its own process group, which is ended whatever happens."""
    import moglstm

    root = str(Path(moglstm.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [*CHILD_COMMAND, json.dumps(request)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: ended with it below
    )
    try:
        out, err = proc.communicate(timeout=timeout_s or CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        proc.communicate()
        return "fault", f"no answer within {timeout_s or CHILD_TIMEOUT_S:.0f} s"
    finally:
        _end_group(proc)
    if proc.returncode < 0:
        return "fault", f"killed by {signal.Signals(-proc.returncode).name}: {err.strip()[-300:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return "fault", f"exit status {proc.returncode}: {err.strip()[-300:]}"
    answer = json.loads(lines[-1])
    return ("pass" if answer["passed"] else "mismatch"), answer["what"]


def _end_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its group id is its pid
    if proc.returncode is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# -- the dispatch


def deferred(x: Tensor) -> bool:
    """Whether no check can run now: inside an outer CUDA-graph capture (it reads values
    on the host), under a tracer or a ``torch.func`` transform (its windows would be
    traced or transformed too), or in ``torch.inference_mode`` (its tensors cannot carry
    the gradients the check compares). Until then the torch-ops loop runs."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    if torch.is_inference_mode_enabled():
        return True
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    return tracing or torch._C._are_functorch_transforms_active()


class CheckedTriton(Backend):
    """``"auto"``'s Triton backend: each layer direction's configuration checked on its
    first window (and the first on a device in a child process); configurations that
    failed, and devices whose child crashed, run ``fallback(x)`` (the torch-ops loop)."""

    name = "triton"

    def __init__(self, fallback: Callable[[Tensor], Backend]) -> None:
        self.fallback = fallback
        self.verdicts: dict[Config, bool] = {}
        self.devices: dict[str, bool] = {}  # False: its child crashed
        self.ran: Counter[tuple[str, str]] = Counter()  # (backend, config): windows run
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            self.verdicts.clear()
            self.devices.clear()
            self.ran.clear()

    def device_usable(self, device: torch.device) -> bool:
        return self.devices.get(str(device), True)

    def run(
        self, steps: Steps, h: Tensor, c: Tensor, d: Direction, reverse: bool, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = steps.x
        flat = d.flat()
        config = config_of(d.spec, x, h, c, mask, flat)
        ok = self.verdicts.get(config)
        if ok is None and not deferred(x):
            with self.lock:
                ok = self.verdicts.get(config)
                if ok is None:
                    ok = self.check(config, d.spec, x, h, c, mask, flat, reverse)
                    self.verdicts[config] = ok
        backend = tb.TRITON if ok else self.fallback(x)
        self.ran[(backend.name, str(config))] += 1
        return backend.run(steps, h, c, d, reverse, mask)

    def check(
        self,
        config: Config,
        spec: DirectionSpec,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        mask: Tensor | None,
        flat: list[Tensor],
        reverse: bool,
    ) -> bool:
        """The first window of ``config``: in a child first where this is the device's
        first check, then here; warns once where it fails."""
        device = str(x.device)
        if not self.devices.get(device, True):
            return False
        start = time.perf_counter()
        tb.ANNOUNCED.add((device, x.dtype, tb.precision(x.dtype)))  # logged here, not again
        message = "moglstm: compiling GPU kernels for %s, once; cached afterwards (%s)"
        logger.info(message, config.dtype, config)
        try:
            if device not in self.devices and child_wanted(x.device):
                verdict, what = run_child(child_request(spec, x, mask, reverse))
                self.devices[device] = verdict != "fault"
                if verdict == "fault":
                    _warn(
                        f"the Triton backend's first check on {device} crashed in a child "
                        f"process ({what}); implementation='auto' uses the torch-ops step loop "
                        "on that device"
                    )
                    return False
                if verdict == "mismatch":
                    _warn(_failed(config, what))
                    return False
            self.devices.setdefault(device, True)
            passed, what = compare_window(spec, x, h, c, mask, flat, reverse)
        except Exception as err:  # a compiler or driver failure: report it, fall back
            passed, what = False, f"{type(err).__name__}: {err}"
        logger.info(
            "moglstm: GPU kernels for %s compiled and checked in %.1f s",
            config.dtype,
            time.perf_counter() - start,
        )
        if not passed:
            _warn(_failed(config, what))
        return passed


def _failed(config: Config, what: str) -> str:
    return (
        f"the Triton backend failed its check for configuration {config}: {what}; "
        "implementation='auto' runs that configuration with the torch-ops step loop"
    )


def _warn(message: str) -> None:
    warnings.warn(f"moglstm: {message}", RuntimeWarning, stacklevel=4)
