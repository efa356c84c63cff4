"""The Triton backend on one NVIDIA GPU, everything in one run of at most 8 minutes.

1. ``compile``: every binary the run needs, compiled in parallel across the machine's
   cores: one child process per layer configuration (the target shape and ptb-paper's
   layers; bfloat16, TF32, IEEE float32, float16; with and without the state mask),
   each the backend's own first check (``python -m moglstm.nn.backends.triton_child``),
   which compiles that configuration, compares it with the torch path and fills Triton's
   on-disk cache; a crash there is one row of data, not the end of the run;
2. ``correctness``: at the target shape (B=64 T=70 H=1024 L=2 r=5 k=84) and ptb-paper's,
   in bfloat16, TF32 and IEEE float32, a training window run eagerly, captured and
   replayed (three calls), outputs and every gradient against float64, beside the
   torch-ops loop's own error in the same dtype;
3. ``latency``: one dependent kernel from Python and inside a CUDA graph, one grid-wide
   barrier (``benchmarks/latency_probe.py``);
4. ``timings``: training steps side by side at the target shape, interleaved, medians:
   cuDNN bfloat16 2 layers, cuDNN float16 1 layer (the shape PyTorch sends to cuDNN's
   persistent algorithm), the Triton backend with and without CUDA graphs (bfloat16,
   2 layers; float16, 1 layer), the torch-ops loop with the whole step in one CUDA
   graph; one window profiled per kernel (``torch.profiler``, eager launches); peak
   memory of each counted from before any graph exists (the graphs' pools included);
5. ``ptb``: ``ptb-paper`` and ``ptb-paper-lstm`` for the same number of steps on a corpus
   that needs no download (PTB if ``--data`` holds it, else synthetic text of PTB's
   vocabulary size), recording tokens/s, the loss curve and the backend each layer ran;
6. ``tests``: the GPU tests (tests/nn/test_triton*.py), without ``-x``, on a hard deadline.

``--budget`` (seconds, default 480) is shared out over the parts; each stops starting
work past its share and the tests get what is left. The JSON summary is written after
each part, so a run cut short keeps what it measured. ``--dry-run`` runs every part on a
CPU under Triton's interpreter at tiny sizes, to check the script itself.

    python benchmarks/gpu_check.py --out gpu_check.json [--data DIR] [--budget 480]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run --out dry.json

Why one script of over 600 lines: it is what a lent GPU machine runs, once, under one
budget and into one summary; its six parts share the shapes, the budget's deadlines and
the JSON writer, and each is short (its helpers beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from childproc import run_group  # noqa: E402  (beside this script)
from latency_probe import probe  # noqa: E402

from moglstm.benchmark import tf32_allowed  # noqa: E402
from moglstm.nn import MogrifierLSTM, backends  # noqa: E402
from moglstm.nn.backends import graphs  # noqa: E402
from moglstm.nn.backends import triton as tb  # noqa: E402
from moglstm.nn.backends import triton_check as tc  # noqa: E402

# seconds of the default 480-second budget per part (scaled to --budget); the tests
# take what is left
SHARES = {"compile": 100, "correctness": 70, "latency": 25, "timings": 110, "ptb": 110}
TARGET = {"batch": 64, "steps": 70, "input": 1024, "hidden": 1024, "layers": 2, "rank": 84}
PTB_VOCAB = 10_000
# (label, dtype, TF32 on)
PRECISIONS = (
    ("bfloat16", "bfloat16", False),
    ("tf32", "float32", True),
    ("ieee", "float32", False),
)


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "interpreter": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# -- the shapes: the target, and ptb-paper's layers as its preset builds them


def target_layer(dry: bool, layers: int | None = None) -> tuple[MogrifierLSTM, int, int]:
    """``(layer, batch, steps)`` at the target shape (tiny in a dry run)."""
    t = TARGET if not dry else {"batch": 2, "steps": 3, "input": 5, "hidden": 6, "layers": 2}
    rank = 3 if dry else t["rank"]
    layer = MogrifierLSTM(
        t["input"], t["hidden"], layers or t["layers"], mogrify_rounds=5, mogrify_rank=rank
    )
    return layer, t["batch"], t["steps"]


def preset(name: str, dry: bool, overrides: list[str] | None = None):
    from moglstm.lm.config import load_config

    extra = DRY_MODEL if dry else []
    return load_config(name, [*extra, *(overrides or [])])


DRY_MODEL = [
    "model.num_params=null",
    "model.hidden_size=16",
    "model.embedding_size=16",
    "model.mogrifier.rank=3",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.bptt=5",
    "train.device=cpu",
]


def ptb_layers(dry: bool, name: str = "ptb-paper") -> list[tuple[MogrifierLSTM, int, int]]:
    """``(layer, batch, steps)`` of each of ptb-paper's recurrent modules, built as its
    preset does (sizes from its parameter budget at PTB's vocabulary), random weights."""
    from moglstm.lm.models.build import build_on_meta

    cfg = preset(name, dry)
    model = build_on_meta(cfg.model, PTB_VOCAB)
    out = []
    g = torch.Generator().manual_seed(0)
    for meta in (m for m in model.modules() if isinstance(m, MogrifierLSTM)):
        layer = copy.deepcopy(meta).to_empty(device="cpu")
        # no state dropout: its masks are drawn per call, so the windows compared would
        # differ (the compile part checks the masked configurations, one mask for both)
        layer.state_dropout = 0.0
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * layer.hidden_size**-0.5)
        out.append((layer, cfg.data.batch_size, cfg.data.bptt))
    return out


def shapes(dry: bool) -> dict[str, tuple[MogrifierLSTM, int, int]]:
    ptb, seen = [], set()
    for layer, batch, steps in ptb_layers(dry):  # one per distinct layer spec
        spec = layer.direction(0, 0).spec
        if spec not in seen:
            seen.add(spec)
            ptb.append((layer, batch, steps))
    named = {f"ptb-paper-{i}" if len(ptb) > 1 else "ptb-paper": v for i, v in enumerate(ptb)}
    return {"target": target_layer(dry), **named}


def precisions(dry: bool) -> tuple[tuple[str, str, bool], ...]:
    # the interpreter computes bfloat16 dots wrongly and has no TF32: float32 and float16
    return (("ieee", "float32", False), ("fp16", "float16", False)) if dry else PRECISIONS


# -- 1. every binary, compiled in parallel (each configuration's first check in a child)


def compile_requests(dry: bool, device: str) -> list[dict]:
    """One child request per layer configuration the run will meet."""
    out, seen = [], set()
    cases = [(k, v, False) for k, v in shapes(dry).items()]
    # ptb-paper trains with a state mask (state dropout); ptb-paper-lstm's layers too
    cases += [(k, v, True) for k, v in shapes(dry).items() if k.startswith("ptb")]
    for i, v in enumerate(ptb_layers(dry, "ptb-paper-lstm")):
        cases += [(f"ptb-paper-lstm-{i}", v, mask) for mask in (False, True)]
    for name, (layer, batch, steps), mask in cases:
        for label, dtype, on in (*precisions(dry), ("fp16", "float16", False)):
            for li in range(layer.num_layers):
                spec = layer.direction(li, 0).spec
                key = (json.dumps(spec.encode()), batch, dtype, on, mask)
                if key in seen:
                    continue
                seen.add(key)
                out.append(
                    {
                        "spec": spec.encode(),
                        "steps": min(steps, 2),
                        "batch": batch,
                        "dtype": dtype,
                        "tf32": on,
                        "mask": mask,
                        "reverse": False,
                        "device": device,
                        "label": f"{name} layer {li} {label}{' mask' if mask else ''}",
                    }
                )
    return out


def run_compile(dry: bool, device: str, deadline: float) -> dict:
    requests = compile_requests(dry, device)
    if dry:  # the plumbing: a few children (each imports torch and triton)
        requests = requests[:: max(1, len(requests) // 3)][:3]
    jobs = max(1, min(len(requests), os.cpu_count() or 1))
    start = time.perf_counter()

    def one(request: dict) -> dict:
        left = deadline - time.perf_counter()
        if left < 5:
            return {"label": request["label"], "verdict": "skipped", "what": "out of budget"}
        t0 = time.perf_counter()
        verdict, what = tc.run_child({k: v for k, v in request.items() if k != "label"}, left)
        return {
            "label": request["label"],
            "verdict": verdict,
            "what": what,
            "seconds": round(time.perf_counter() - t0, 1),
        }

    with ThreadPoolExecutor(jobs) as pool:
        rows = list(pool.map(one, requests))
    verdicts = Counter(r["verdict"] for r in rows)
    return {"jobs": jobs, "seconds": round(time.perf_counter() - start, 1), "verdicts": verdicts,
            "rows": rows}


# -- 2. correctness at the target and ptb-paper shapes, eager, captured and replayed


def window_results(layer: MogrifierLSTM, x: torch.Tensor, cot: torch.Tensor) -> list:
    """Outputs, final state and every gradient of one training window."""
    layer.zero_grad(set_to_none=True)
    xs = x.detach().clone().requires_grad_()
    out, (h, c) = layer(xs)
    loss = (out.float() * cot).sum() + h.float().sum() * 0.5 - c.float().sum() * 0.25
    loss.backward()
    return [out, h, c, xs.grad, *(p.grad for p in layer.parameters())]


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_correctness(dry: bool, device: str, deadline: float) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    for name, (layer, batch, steps) in shapes(dry).items():
        x = torch.randn(steps, batch, layer.input_size, generator=g)
        cot = torch.randn(steps, batch, layer.hidden_size, generator=g).to(device)
        truth_layer = copy.deepcopy(layer).to(device, torch.float64)
        truth_layer.implementation = "fused"
        truth_layer.backend_for = lambda steps: backends.TORCH_LOOP
        truth = window_results(truth_layer, x.to(device, torch.float64), cot)
        for label, dtype, on in precisions(dry):
            if time.perf_counter() > deadline:
                rows.append({"shape": name, "precision": label, "skipped": "out of budget"})
                continue
            try:
                rows.append(correct_one(name, layer, x, cot, truth, label, dtype, on, device))
            except Exception as err:  # a failing cell is data
                rows.append({"shape": name, "precision": label, "error": repr(err),
                             "traceback": traceback.format_exc()[-2000:]})
    return rows


def correct_one(name, layer, x, cot, truth, label, dtype, on, device) -> dict:
    dt = getattr(torch, dtype)
    with tf32_allowed(on):
        graphs.GRAPHS.clear()
        before = (graphs.GRAPHS.captures, graphs.GRAPHS.replays)
        tri = copy.deepcopy(layer).to(device, dt)
        tri.implementation = "triton"
        runs = [window_results(tri, x.to(device, dt), cot) for _ in range(3)]
        loop = copy.deepcopy(layer).to(device, dt)
        loop.implementation = "fused"
        loop.backend_for = lambda steps: backends.TORCH_LOOP
        base = window_results(loop, x.to(device, dt), cot)
    base_err = max(rel(a, b) for a, b in zip(base, truth, strict=True))
    errs = [max(rel(a, b) for a, b in zip(r, truth, strict=True)) for r in runs]
    floor = tc.FLOORS.get(f"{label}-float32", tc.FLOOR_16BIT)
    allowed = max(floor, min(tc.SLACK * base_err, tc.CAP))
    return {
        "shape": name,
        "precision": label,
        "worst_rel_error": {"eager": errs[0], "captured": errs[1], "replayed": errs[2]},
        "torch_loop_rel_error": base_err,
        "allowed": allowed,
        "passed": all(e <= allowed for e in errs),
        "graph_captures": graphs.GRAPHS.captures - before[0],
        "graph_replays": graphs.GRAPHS.replays - before[1],
    }


# -- 4. timings, the profile of one window, peak memory


def lstm_step(module: torch.nn.Module, x: torch.Tensor):
    def step() -> None:
        out, _ = module(x)
        out.float().sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step


def whole_step_graph(module: torch.nn.Module, x: torch.Tensor):
    """A training step (forward and backward) captured whole in one CUDA graph, as
    PyTorch's documentation captures a network; returns its replay."""
    static_x = x.detach().clone().requires_grad_()

    def step() -> None:
        out, _ = module(static_x)
        out.float().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            module.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def candidates(dry: bool, device: str) -> dict[str, tuple]:
    """name -> (build, dtype, CUDA graphs of the Triton windows on)."""
    target, batch, steps = target_layer(dry)
    one, _, _ = target_layer(dry, layers=1)
    I, H, L = target.input_size, target.hidden_size, target.num_layers

    def cudnn(layers: int):
        return lambda: torch.nn.LSTM(I, H, layers)

    def mog(layer: MogrifierLSTM, impl: str):
        def build():
            m = copy.deepcopy(layer)
            m.implementation = impl
            if impl == "fused":
                m.backend_for = lambda s: backends.TORCH_LOOP
            return m

        return build

    bf16 = "float32" if dry else "bfloat16"
    fp16 = "float16"
    out = {
        f"cudnn {bf16} {L} layers": (cudnn(L), bf16, None),
        f"cudnn {fp16} 1 layer (persistent)": (cudnn(1), fp16, None),
        f"triton {bf16} {L} layers, graphs": (mog(target, "triton"), bf16, True),
        f"triton {bf16} {L} layers, no graphs": (mog(target, "triton"), bf16, False),
        # the speed lever of docs/gpu.md: low-rank rounds in two launches (u made once)
        f"triton {bf16} {L} layers, graphs, low-rank in two launches": (
            mog(target, "triton"),
            bf16,
            True,
            "two",
        ),
        f"triton {fp16} 1 layer, graphs": (mog(one, "triton"), fp16, True),
        f"torch-loop {bf16} {L} layers, whole step in a graph": (
            mog(target, "fused"),
            bf16,
            "whole",
        ),
    }
    return {k: (*v[:3], v[3] if len(v) > 3 else "one", batch, steps) for k, v in out.items()}


@contextlib.contextmanager
def graphs_on(flag: bool):
    """Capture of the Triton windows on or off for a while, keeping the graphs captured
    so far (``graphs.set_enabled(False)`` would free them: every candidate in turn would
    then capture anew)."""
    saved, graphs.ENABLED = graphs.ENABLED, flag
    try:
        yield
    finally:
        graphs.ENABLED = saved


@contextlib.contextmanager
def low_rank(mode: str):
    """The low-rank launch mode for a while (graphs of both modes are kept: the mode is
    part of a window's graph key)."""
    saved, tb.LOW_RANK_LAUNCHES = tb.LOW_RANK_LAUNCHES, mode
    try:
        yield
    finally:
        tb.LOW_RANK_LAUNCHES = saved


def run_timings(dry: bool, device: str, deadline: float) -> dict:
    runs, warmup = (1, 0) if dry else (10, 3)
    steps_fns, rows = {}, {}
    for name, (build, dtype, capture, lever, batch, steps) in candidates(dry, device).items():
        if time.perf_counter() > deadline:
            rows[name] = {"skipped": "out of budget"}
            continue
        try:
            dt = getattr(torch, dtype)
            with graphs_on(capture is True), low_rank(lever):
                module = build().to(device, dt)
                x = torch.randn(steps, batch, module.input_size, device=device, dtype=dt)
                x.requires_grad_()
                rows[name] = {"peak_memory_mb": peak_memory(module, x, capture, device)}
                fn = lstm_step(module, x)
                if capture == "whole" and device == "cuda":
                    fn = whole_step_graph(module, x)
            steps_fns[name] = (fn, capture, lever)
        except Exception as err:
            rows[name] = {"error": repr(err), "traceback": traceback.format_exc()[-2000:]}
    times: dict[str, list[float]] = {name: [] for name in steps_fns}
    for i in range(warmup + runs):  # interleaved: each candidate in turn
        for name, (fn, capture, lever) in steps_fns.items():
            if time.perf_counter() > deadline and i >= warmup + 2:
                continue
            try:
                with graphs_on(capture is True), low_rank(lever):
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as err:
                rows[name]["error"] = repr(err)
    cudnn = next((k for k in times if k.startswith("cudnn") and "2 layers" in k), None)
    for name, ts in times.items():
        if ts:
            med = sorted(ts)[len(ts) // 2]
            rows[name].update({"median_ms": round(med, 3), "runs": len(ts)})
    ref = rows.get(cudnn, {}).get("median_ms") if cudnn else None
    for row in rows.values():
        if ref and "median_ms" in row:
            row["ratio_to_cudnn_2_layers"] = round(row["median_ms"] / ref, 2)
    profile = None
    if time.perf_counter() < deadline:
        profile = profile_window(dry, device)
    return {"rows": rows, "profile": profile}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(module: torch.nn.Module, x: torch.Tensor, capture, device: str) -> float | None:
    """MiB above what the module and input hold, over three training steps (eager,
    captured, replayed), counted from before any graph of this shape exists."""
    if device != "cuda":
        return None
    graphs.GRAPHS.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn = whole_step_graph(module, x) if capture == "whole" else lstm_step(module, x)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def profile_window(dry: bool, device: str) -> list[dict]:
    """One Triton training window (eager launches) per kernel, by total device time."""
    from torch.profiler import ProfilerActivity, profile

    layer, batch, steps = target_layer(dry)
    dt = torch.float32 if dry else torch.bfloat16
    layer = layer.to(device, dt)
    layer.implementation = "triton"
    x = torch.randn(steps, batch, layer.input_size, device=device, dtype=dt, requires_grad=True)
    previous = graphs.set_enabled(False)
    try:
        step = lstm_step(layer, x)
        step()  # compiled before the profile
        sync(device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            step()
            sync(device)
    finally:
        graphs.set_enabled(previous)
    attr = "device_time_total" if device == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
    return [
        {"name": e.key[:80], "count": e.count, "total_us": round(getattr(e, attr, 0), 1)}
        for e in events[:20]
    ]


# -- 5. ptb-paper and ptb-paper-lstm on a corpus that needs no download


def corpus_dir(data: str | None, dry: bool) -> tuple[list[str], str]:
    """Overrides for PTB where ``data`` holds it, else a synthetic corpus of PTB's
    vocabulary size (Zipf-like word frequencies), written to a temp folder."""
    if data and (Path(data) / "ptb").exists():
        return [f"data.data_dir={data}"], "ptb"
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-corpus-"))
    g = torch.Generator().manual_seed(0)
    vocab = 50 if dry else PTB_VOCAB - 1  # and <eos>
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    for split, n in (("train", 4_000 if dry else 1_500_000), ("valid", 400 if dry else 40_000),
                     ("test", 400 if dry else 40_000)):
        ids = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
        words = [f"w{i}" for i in ids]
        lines = [" ".join(words[i : i + 20]) for i in range(0, n, 20)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return ["data.corpus=text", f"data.path={folder}"], f"synthetic ({vocab + 1} words)"


def train_run(name: str, steps: int, overrides: list[str], dry: bool, seconds: float) -> dict:

    checked = backends.CHECKED_TRITON
    before = Counter(checked.ran)
    picked: Counter[str] = Counter()  # backends.select's choice per layer call
    select = backends.select

    def recorded(*args, **kwargs):
        backend = select(*args, **kwargs)
        picked[backend.name] += 1
        return backend

    backends.select = recorded
    try:
        return _train_run(name, steps, overrides, dry, seconds, checked, before, picked)
    finally:
        backends.select = select


def _train_run(name, steps, overrides, dry, seconds, checked, before, picked) -> dict:
    from moglstm.lm.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = preset(
            name,
            dry,
            [
                f"train.max_steps={steps}",
                f"train.eval_every={steps}",
                f"train.log_every={max(1, steps // 20)}",
                f"train.max_time={max(int(seconds), 1)}s",
                "train.eval_temperature_tokens=0",
                f"out_dir={tmp}",
                f"name=gpu-check-{name}",
                *overrides,
            ],
        )
        start = time.perf_counter()
        result = train(cfg, quiet=True)
        metrics = Path(result["run_dir"]) / "metrics.jsonl"
        curve = []
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                event = json.loads(line)
                if event.get("split") == "train" and "loss" in event:
                    curve.append((event["step"], round(event["loss"], 4)))
    ran = Counter(checked.ran)
    ran.subtract(before)
    return {
        "steps": result["step"],
        "tokens_per_s": result["tokens_per_s"],
        "train_loss": result["train_loss"],
        "loss_curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
        "stopped_by": result.get("stopped_by"),
        # windows per (backend, configuration) of the checked Triton dispatch; empty: the
        # layers ran another backend ("auto" on CPU, or the LSTM's own path)
        "backends_ran": {f"{b}: {c}": n for (b, c), n in ran.items() if n},
        "layer_calls_by_backend": dict(picked),  # what select() picked, per layer call
    }


def run_ptb(dry: bool, data: str | None, deadline: float) -> dict:
    overrides, corpus = corpus_dir(data, dry)
    steps = 2 if dry else 300
    out: dict = {"corpus": corpus}
    for name in ("ptb-paper", "ptb-paper-lstm"):
        left = deadline - time.perf_counter()
        share = left / (2 if name == "ptb-paper" else 1)
        if share < 5:
            out[name] = {"skipped": "out of budget"}
            continue
        try:
            out[name] = train_run(name, steps, overrides, dry, share)
        except Exception as err:
            out[name] = {"error": repr(err), "traceback": traceback.format_exc()[-2000:]}
    return out


# -- 6. the GPU tests, last, on a hard deadline


def run_tests(dry: bool, seconds: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    args += ["tests/nn/test_triton.py", "tests/nn/test_triton_graph.py",
             "tests/nn/test_triton_check.py"]
    if dry:  # the plumbing: one interpreter comparison and the launch counts
        args += ["-k", "rounds_and_ranks and 3-2 or launches_per_step and ieee-gpu"]
    start = time.perf_counter()
    rc, out, err = run_group(args, seconds, cwd=ROOT, env=env)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    return {
        "rc": rc,
        "summary": lines[-1] if lines else "",
        "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:50],
        "tail": "\n".join(lines[-30:]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON summary")
    parser.add_argument("--data", help="corpus folder holding ptb/ (else synthetic text)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check, tiny sizes")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU", file=sys.stderr)
        return 2
    if dry and not os.environ.get("TRITON_INTERPRET"):
        print("--dry-run needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        return 2
    if dry:  # the children check on the CPU too (under the interpreter)
        tc.CHILD_CHECK = "1"
    device = "cpu" if dry else "cuda"
    start = time.perf_counter()
    end = start + args.budget
    scale = args.budget / 480.0
    summary: dict = {"dry_run": dry, "budget_s": args.budget, "environment": environment()}
    out = Path(args.out)

    def save(part: str, value) -> None:
        summary[part] = value
        summary["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(summary, indent=1, default=str))
        print(f"[{summary['elapsed_s']:6.1f} s] {part} done", flush=True)

    parts = (
        ("compile", lambda d: run_compile(dry, device, d)),
        ("correctness", lambda d: run_correctness(dry, device, d)),
        ("latency", lambda d: probe(dry, timeout_s=max(5.0, d - time.perf_counter()))),
        ("timings", lambda d: run_timings(dry, device, d)),
        ("ptb", lambda d: run_ptb(dry, args.data, d)),
    )
    reserve = 60 * scale  # the tests' minimum
    for part, fn in parts:
        deadline = min(time.perf_counter() + SHARES[part] * scale, end - reserve)
        if deadline - time.perf_counter() < 2:
            save(part, {"skipped": "out of budget"})
            continue
        try:
            save(part, fn(deadline))
        except Exception as err:
            save(part, {"error": repr(err), "traceback": traceback.format_exc()})
    save("tests", run_tests(dry, max(10.0, end - time.perf_counter())))
    print(table(summary))
    return 0


def table(summary: dict) -> str:
    """The short table printed last (the full numbers are in the JSON)."""
    lines = [f"compile: {summary['compile'].get('verdicts')} in "
             f"{summary['compile'].get('seconds')} s"]
    for r in summary.get("correctness", []):
        if isinstance(r, dict) and "worst_rel_error" in r:
            e = r["worst_rel_error"]
            lines.append(
                f"correct {r['shape']:10s} {r['precision']:9s} passed={r['passed']} eager "
                f"{e['eager']:.1e} captured {e['captured']:.1e} replayed {e['replayed']:.1e} "
                f"(torch loop {r['torch_loop_rel_error']:.1e})"
            )
        else:
            lines.append(f"correct {r}")
    lines.append(f"latency (us): {summary.get('latency')}")
    timings = summary.get("timings", {})
    for name, r in (timings.get("rows", {}) if isinstance(timings, dict) else {}).items():
        lines.append(
            f"{name:50s} {r.get('median_ms', float('nan')):9.2f} ms "
            f"x{r.get('ratio_to_cudnn_2_layers') or float('nan'):.2f} cuDNN "
            f"mem {r.get('peak_memory_mb')} MiB {r.get('error', '')}"
        )
    ptb = summary.get("ptb", {})
    for name in ("ptb-paper", "ptb-paper-lstm"):
        r = ptb.get(name, {}) if isinstance(ptb, dict) else {}
        lines.append(f"{name}: {r.get('tokens_per_s')} tok/s, {r.get('steps')} steps, "
                     f"loss {r.get('train_loss')} {r.get('error', '')}")
    lines.append(f"tests: {summary['tests'].get('summary')}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
