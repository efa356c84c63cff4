"""``moglstm benchmark``: MogrifierLSTM against torch.nn.LSTM of the same shape.

It lives beside :mod:`moglstm.nn`, the layers it measures, not in the language-model
toolkit: it times layers, not models. It cannot live inside ``nn``, which imports
torch only and does no I/O or printing, while this module prints, spawns child
processes and writes JSON. It reaches the layers through their public seam
(:class:`~moglstm.nn.MogrifierLSTM`, :mod:`moglstm.nn.backends`) only.

Every implementation runs in one process, interleaved (torch, reference, fused,
torch, ...), so a noisy machine slows all of them alike; the report gives the
median over the timed runs, the ratio to ``torch.nn.LSTM``, and that ratio
divided by the arithmetic floor ``1 + rounds_cost / lstm_cost`` (the extra
multiply-adds of the Mogrifier rounds over an LSTM step).

Peak memory is measured per implementation in a fresh child process on CPU (the
rise of the resident-set high-water mark over one training step) and with
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from moglstm.nn import MogrifierLSTM, backends

# "torch-loop" is the fused path's Python loop of torch ops (the CUDA path before the
# Triton backend); "triton" the Triton backend (CUDA)
#: What ``--impl`` can time: torch.nn.LSTM, and MogrifierLSTM by path (not the layer's
#: ``implementation`` argument, :data:`moglstm.nn.backends.IMPLEMENTATIONS`).
BENCHMARKED = ("torch", "reference", "fused", "torch-loop", "triton")
DEFAULT_IMPLEMENTATIONS = {
    "cpu": ("torch", "reference", "fused"),
    "cuda": ("torch", "torch-loop", "triton"),
}
MODES = ("forward", "train")
# "tf32": float32 tensors with TF32 matrix products allowed (cuBLAS, cuDNN and Triton)
DTYPES = ("float32", "tf32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class Shape:
    batch: int = 64
    seq_len: int = 70
    hidden: int = 512
    input: int | None = None  # None: same as hidden
    layers: int = 2
    rounds: int = 5
    rank: int | None = 84

    def __post_init__(self) -> None:
        problems = [
            f"{_SHAPE_LETTERS[name]}={getattr(self, name)} must be >= {low}"
            for name, low in (("batch", 1), ("seq_len", 1), ("hidden", 1), ("layers", 1))
            + (("rounds", 0),)
            if getattr(self, name) < low
        ]
        if self.input is not None and self.input < 1:
            problems.append(f"I={self.input} must be >= 1")
        limit = min(self.hidden, self.input_size)
        if self.rank is not None and self.rounds and not 0 < self.rank < limit and not problems:
            problems.append(
                f"k={self.rank} must be in [1, {limit}) (below H and I), or k=none for full rank"
            )
        if problems:
            raise ValueError(f"shape {self.label()}: {'; '.join(problems)}")

    @property
    def input_size(self) -> int:
        return self.hidden if self.input is None else self.input

    def label(self) -> str:
        return (
            f"B={self.batch} T={self.seq_len} I={self.input_size} H={self.hidden} "
            f"L={self.layers} r={self.rounds} k={self.rank}"
        )

    def floor(self) -> float:
        """Multiply-adds of a Mogrifier LSTM step over an LSTM step (all layers)."""
        lstm, extra = 0, 0
        for layer in range(self.layers):
            i = self.input_size if layer == 0 else self.hidden
            lstm += 4 * self.hidden * (i + self.hidden)
            per_round = i * self.hidden if self.rank is None else self.rank * (i + self.hidden)
            extra += self.rounds * per_round
        return 1.0 + extra / lstm


DEFAULT_GRID = (
    Shape(),
    Shape(batch=16, hidden=256),
    Shape(batch=64, hidden=1024),
)


@dataclass
class Result:
    shape: dict
    implementation: str
    mode: str
    device: str
    dtype: str
    median_ms: float
    runs: int
    ratio_to_torch: float | None = None
    ratio_over_floor: float | None = None
    tokens_per_s: float = 0.0
    peak_memory_mb: float | None = None
    memory_ratio_to_torch: float | None = None
    setup_s: float | None = None  # fused on CPU: building or loading the compiled loop, once
    times_ms: list[float] = field(default_factory=list)


def build(impl: str, shape: Shape, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The module under test; every one has the same LSTM shape."""
    if impl == "torch":
        module = torch.nn.LSTM(shape.input_size, shape.hidden, shape.layers)
    else:
        module = MogrifierLSTM(
            shape.input_size,
            shape.hidden,
            shape.layers,
            mogrify_rounds=shape.rounds,
            mogrify_rank=shape.rank,
            implementation="fused" if impl == "torch-loop" else impl,
        )
        if impl == "torch-loop":  # pin the backend that "fused" would no longer pick
            module.backend_for = lambda steps: backends.TORCH_LOOP
    return module.to(device=device, dtype=dtype)


def torch_dtype(dtype: str) -> torch.dtype:
    return torch.float32 if dtype == "tf32" else getattr(torch, dtype)


class tf32_allowed:
    """Context: TF32 products allowed in cuBLAS/cuDNN (and so in the Triton backend)
    exactly when ``on``; restored after."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def make_input(shape: Shape, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A ``(T, B, I)`` input that asks for its gradient, as an embedding output does."""
    size = (shape.seq_len, shape.batch, shape.input_size)
    return torch.randn(size, device=device, dtype=dtype, requires_grad=True)


def step_fn(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One forward (inference, no autograd) or one training step (forward + backward)."""

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        out, _ = module(x)
        out.sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return forward if mode == "forward" else train


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], None]], runs: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Milliseconds of each function, run in turn ``warmup + runs`` times."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def peak_memory_mb(impl: str, shape: Shape, device: str, dtype: str) -> float | None:
    """Peak memory of one training step above what the module and input hold."""
    if device.startswith("cuda"):
        module = build(impl, shape, device, torch_dtype(dtype))
        x = make_input(shape, device, torch_dtype(dtype))
        step = step_fn(module, x, "train")
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not sys.platform.startswith("linux"):
        return None
    args = json.dumps({"impl": impl, "shape": asdict(shape), "dtype": dtype})
    code = f"from moglstm.benchmark import _memory_child; _memory_child({args!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(args_json: str) -> None:
    """Runs in a fresh process: print the high-water rise of one training step, MiB."""
    args = json.loads(args_json)
    shape = Shape(**args["shape"])
    dtype = torch_dtype(args["dtype"])
    module = build(args["impl"], shape, "cpu", dtype)
    x = make_input(shape, "cpu", dtype)
    base = _vm_hwm_kb()
    step_fn(module, x, "train")()
    print((_vm_hwm_kb() - base) / 1024)


def run_benchmark(
    shapes: Sequence[Shape] = DEFAULT_GRID,
    implementations: Sequence[str] | None = None,
    modes: Sequence[str] = MODES,
    runs: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Time every implementation on every shape and mode; see the module docstring.
    ``implementations`` defaults to :data:`DEFAULT_IMPLEMENTATIONS` of the device kind."""
    if implementations is None:
        implementations = DEFAULT_IMPLEMENTATIONS["cuda" if device.startswith("cuda") else "cpu"]
    check_options(implementations, modes, runs, warmup, dtype)
    with tf32_allowed(dtype == "tf32"):
        return _run_grid(shapes, implementations, modes, runs, warmup, device, dtype, memory, log)


def _run_grid(shapes, implementations, modes, runs, warmup, device, dtype, memory, log):
    dtype_ = torch_dtype(dtype)
    setup = None
    if "fused" in implementations and not device.startswith("cuda"):
        setup = compiled_loop_setup(dtype_, log)
    results = []
    for shape in shapes:
        modules = {impl: build(impl, shape, device, dtype_) for impl in implementations}
        x = make_input(shape, device, dtype_)
        for mode in modes:
            fns = {impl: step_fn(m, x, mode) for impl, m in modules.items()}
            times = time_interleaved(fns, runs, warmup, device)
            rows = summarise(shape, mode, device, dtype, times)
            for row in rows:
                row.setup_s = setup if row.implementation == "fused" else None
            if memory and mode == "train":
                add_memory(rows, shape, device, dtype)
            for row in rows:
                log(format_row(row))
            results += rows
    return results


def compiled_loop_setup(dtype: torch.dtype, log: Callable[[str], None]) -> float:
    """Seconds to build (first use on this machine) or load the fused path's compiled CPU
    loop, reported apart from the timings, which never include it."""
    start = time.perf_counter()
    available = backends.step_loop(torch.zeros(1, dtype=dtype)) is backends.COMPILED_LOOP
    seconds = time.perf_counter() - start
    if available:
        log(f"fused: compiled step loop built or loaded in {seconds:.2f} s (not in the timings)")
    else:
        log("fused: no compiled step loop here (no C compiler or BLAS): Python step loop")
    return seconds


def summarise(shape: Shape, mode: str, device: str, dtype: str, times) -> list[Result]:
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    base = medians.get("torch")
    rows = []
    for impl, ms in medians.items():
        ratio = ms / base if base else None
        rows.append(
            Result(
                shape=asdict(shape),
                implementation=impl,
                mode=mode,
                device=device,
                dtype=dtype,
                median_ms=ms,
                runs=len(times[impl]),
                ratio_to_torch=ratio,
                ratio_over_floor=None
                if ratio is None or impl == "torch"
                else ratio / shape.floor(),
                tokens_per_s=shape.batch * shape.seq_len / (ms / 1e3),
                times_ms=[round(t, 3) for t in times[impl]],
            )
        )
    return rows


def add_memory(rows: list[Result], shape: Shape, device: str, dtype: str) -> None:
    for row in rows:
        row.peak_memory_mb = peak_memory_mb(row.implementation, shape, device, dtype)
    base = next((r.peak_memory_mb for r in rows if r.implementation == "torch"), None)
    for row in rows:
        if base and row.peak_memory_mb is not None:
            row.memory_ratio_to_torch = row.peak_memory_mb / base


def format_row(r: Result) -> str:
    shape = Shape(**r.shape)
    parts = [
        f"{shape.label():42s}",
        f"{r.mode:7s}",
        f"{r.implementation:10s}",
        f"{r.median_ms:9.1f} ms",
    ]
    parts.append(f"x{r.ratio_to_torch:5.2f} torch" if r.ratio_to_torch else " " * 12)
    parts.append(f"x{r.ratio_over_floor:5.2f} floor" if r.ratio_over_floor else " " * 12)
    parts.append(f"{r.tokens_per_s:9.0f} tok/s")
    if r.peak_memory_mb is not None:
        mem = f"{r.peak_memory_mb:8.1f} MiB"
        if r.memory_ratio_to_torch is not None:
            mem += f" (x{r.memory_ratio_to_torch:.2f})"
        parts.append(mem)
    return "  ".join(parts)


def check_options(implementations, modes, runs, warmup, dtype) -> None:
    for impl in implementations:
        if impl not in BENCHMARKED:
            raise ValueError(f"implementation must be one of {BENCHMARKED}, got {impl!r}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


_SHAPE_KEYS = {
    "B": "batch",
    "T": "seq_len",
    "H": "hidden",
    "I": "input",
    "L": "layers",
    "r": "rounds",
    "k": "rank",
}
_SHAPE_LETTERS = {name: letter for letter, name in _SHAPE_KEYS.items()}


def shape_spec(shape: Shape, base: Shape | None = None) -> str:
    """``shape`` in ``--shape``'s keys (``B=64 T=70 H=512 L=2 r=5 k=84``); with ``base``,
    only the keys in which it differs."""
    items = []
    for letter, name in _SHAPE_KEYS.items():
        value = getattr(shape, name)
        if (base is not None and value == getattr(base, name)) or (letter == "I" and value is None):
            continue  # I=none (the default) is the hidden size
        items.append(f"{letter}={'none' if value is None else value}")
    return " ".join(items)


def parse_shape(text: str) -> Shape:
    """``"B=64,T=70,H=512,I=512,L=2,r=5,k=84"`` (any subset; I=none and k=none allowed).

    Raises:
        ValueError: an unknown key, a value that is not an integer, or one out of range.
    """
    values: dict = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _SHAPE_KEYS:
            raise ValueError(
                f"bad shape item {item!r} in {text!r}: use KEY=VALUE with KEY in "
                f"{', '.join(_SHAPE_KEYS)}"
            )
        if value.lower() == "none" and key in ("I", "k"):
            values[_SHAPE_KEYS[key]] = None
            continue
        try:
            values[_SHAPE_KEYS[key]] = int(value)
        except ValueError:
            raise ValueError(f"bad shape item {item!r}: {key} must be an integer") from None
    if not values:
        raise ValueError(f"empty shape {text!r}: give e.g. B=64,T=70,H=512")
    return Shape(**values)
