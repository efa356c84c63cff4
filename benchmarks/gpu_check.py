"""The Triton backend on one NVIDIA GPU, in one go (about 8 minutes at most).

1. the Triton tests on the GPU (tests/nn/test_triton.py without TRITON_INTERPRET: the
   same comparisons with the reference path, compiled kernels), and the backend's
   self-check;
2. what one dependent kernel costs, launched from Python and replayed in a CUDA graph,
   and what one grid-wide barrier costs (``benchmarks/latency_probe.py``): the figures
   the estimate in docs/gpu.md assumes, and what a persistent single-launch mode would pay;
3. the benchmark grid: torch.nn.LSTM (cuDNN), the old torch-ops loop and the Triton
   backend with and without CUDA-graph capture of its windows, forward and training
   step, float32, TF32 and bfloat16, with peak memory, at the issue's target shape
   (B=64 T=70 H=1024 L=2 r=5 k=84) and at H=512;
4. 300 training steps of the ``ptb-paper`` preset (tokens/s), and a few steps of the
   same with the old torch-ops loop for the ratio.

Each part writes into one JSON summary as soon as it ends, so a run cut short keeps what
it measured. ``--dry-run`` runs the parts a CPU can on tiny sizes (the tests under
Triton's interpreter, a small grid, two training steps of a shrunken ptb-paper) to check
the script itself.

    python benchmarks/gpu_check.py --out gpu_check.json [--data DIR]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run --out dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from latency_probe import probe  # noqa: E402  (beside this script)

from moglstm.benchmark import Shape, run_benchmark  # noqa: E402

BUDGET_S = {"tests": 170, "latency": 30, "benchmark": 200, "ptb_paper": 90}
TARGET = Shape(batch=64, seq_len=70, hidden=1024, layers=2, rounds=5, rank=84)
GRID = (TARGET, Shape(batch=64, seq_len=70, hidden=512, layers=2, rounds=5, rank=84))
DTYPES = ("bfloat16", "tf32", "float32")


def environment() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "interpreter": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_tests(dry: bool) -> dict:
    """pytest on the Triton tests in a child process (its own timeout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    args = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    args += ["tests/nn/test_triton.py", "tests/nn/test_triton_graph.py"]
    if dry:  # the plumbing: one interpreter comparison (the test suite runs them all)
        args += ["-k", "rounds_and_ranks and 3-2"]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUDGET_S["tests"]
        )
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = "timeout", f"{err.stdout or ''}"
    lines = [line for line in str(text).splitlines() if line.strip()]
    return {
        "rc": rc,
        "summary": lines[-1] if lines else "",
        "tail": "\n".join(lines[-30:]),
        "seconds": round(time.perf_counter() - start, 1),
    }


def self_check(device: str) -> dict:
    from moglstm.nn.backends import triton as tb

    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if device == "cpu" and dtype == torch.bfloat16:
            continue  # the interpreter computes bfloat16 dots wrongly
        start = time.perf_counter()
        out[str(dtype)] = {
            "passed": tb.self_check.__wrapped__(device, dtype),
            "seconds": round(time.perf_counter() - start, 2),
        }
    return out


def run_grid(device: str, dry: bool, deadline: float) -> list[dict]:
    """Each shape and dtype: torch.nn.LSTM, the old torch-ops loop and the Triton backend
    with its windows in CUDA graphs (the default), then the Triton backend with eager
    launches (``cuda_graphs: false`` in its rows)."""
    from moglstm.nn.backends import graphs

    rows: list[dict] = []
    shapes = (Shape(batch=4, seq_len=3, hidden=16, layers=1, rounds=2, rank=3),) if dry else GRID
    for shape in shapes:
        for dtype in ("float32",) if dry else DTYPES:
            for impls, capture in ((("torch", "torch-loop", "triton"), True), (("triton",), False)):
                if time.perf_counter() > deadline:
                    rows.append({"shape": asdict(shape), "dtype": dtype, "skipped": "out of time"})
                    continue
                previous = graphs.set_enabled(capture)
                try:
                    results = run_benchmark(
                        [shape],
                        impls,
                        runs=1 if dry else 10,
                        warmup=0 if dry else 3,  # the Triton windows: eager, captured, replayed
                        device=device,
                        dtype=dtype,
                        memory=not dry,
                        log=print,
                    )
                    rows += [{**asdict(r), "cuda_graphs": capture} for r in results]
                except Exception as err:  # one failing cell (e.g. cuDNN without bf16) is data
                    rows.append({"shape": asdict(shape), "dtype": dtype, "error": repr(err)})
                    traceback.print_exc()
                finally:
                    graphs.set_enabled(previous)
    return rows


def train_speed(steps: int, overrides: list[str], old_loop: bool) -> dict:
    """``ptb-paper`` for ``steps`` steps; tokens/s (the toolkit's own figure)."""
    from moglstm.lm.config import load_config
    from moglstm.lm.train import train
    from moglstm.nn import backends

    original = backends._triton_ready
    if old_loop:  # what "auto" picked on CUDA before the Triton backend
        backends._triton_ready = lambda x: False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                "ptb-paper",
                [
                    f"train.max_steps={steps}",
                    f"train.eval_every={steps}",
                    # tokens/s of training: skip the paper's temperature search at validation
                    "train.eval_temperature_tokens=0",
                    f"out_dir={tmp}",
                    "name=gpu-check",
                    *overrides,
                ],
            )
            start = time.perf_counter()
            result = train(cfg, quiet=True)
            return {
                "steps": steps,
                "tokens_per_s": result["tokens_per_s"],
                "train_loss": result["train_loss"],
                "seconds": round(time.perf_counter() - start, 1),
                "old_loop": old_loop,
            }
    finally:
        backends._triton_ready = original


def run_ptb(dry: bool, data: str | None) -> dict:
    overrides = [f"data.data_dir={data}"] if data else []
    if dry:  # a shrunken model on a tiny corpus on the CPU: the plumbing only
        corpus = Path(tempfile.mkdtemp())
        for split, n in (("train", 400), ("valid", 40), ("test", 40)):
            words = " ".join(f"w{i % 37}" for i in range(n))
            (corpus / f"{split}.txt").write_text(words + "\n")
        overrides = [
            "data.corpus=text",
            f"data.path={corpus}",
            "model.num_params=null",
            "model.hidden_size=16",
            "model.mogrifier.rank=3",
            "data.batch_size=2",
            "data.eval_batch_size=2",
            "data.bptt=5",
            "train.device=cpu",
        ]
    new = train_speed(2 if dry else 300, overrides, old_loop=False)
    old = train_speed(2 if dry else 20, overrides, old_loop=True)
    return {"triton": new, "torch_loop": old, "speedup": new["tokens_per_s"] / old["tokens_per_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON summary")
    parser.add_argument("--data", help="corpus folder (default: $MOGLSTM_DATA or the cache)")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check, tiny sizes")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run on a CPU", file=sys.stderr)
        return 2
    if dry and not os.environ.get("TRITON_INTERPRET"):
        print("--dry-run needs TRITON_INTERPRET=1 (set before Python starts)", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    start = time.perf_counter()
    summary: dict = {"dry_run": dry, "environment": environment()}
    out = Path(args.out)

    def save(part: str, value) -> None:
        summary[part] = value
        summary["elapsed_s"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(summary, indent=1, default=str))
        print(f"[{summary['elapsed_s']:6.1f} s] {part} done", flush=True)

    save("tests", run_tests(dry))
    for part, fn in (
        ("self_check", lambda: self_check(device)),
        ("latency", lambda: probe(dry, timeout_s=BUDGET_S["latency"])),
        ("benchmark", lambda: run_grid(device, dry, time.perf_counter() + BUDGET_S["benchmark"])),
        ("ptb_paper", lambda: run_ptb(dry, args.data)),
    ):
        try:
            save(part, fn())
        except Exception as err:
            save(part, {"error": repr(err), "traceback": traceback.format_exc()})
    print(table(summary))
    return 0


def table(summary: dict) -> str:
    """The short table printed last (the full numbers are in the JSON)."""
    lines = [f"tests: {summary['tests'].get('summary')}", f"self-check: {summary['self_check']}"]
    lines.append(f"latency (us): {summary.get('latency')}")
    for r in summary.get("benchmark", []):
        if "median_ms" in r:
            ratio = r.get("ratio_to_torch")
            how = ""
            if r["implementation"] == "triton":
                how = "graph" if r["cuda_graphs"] else "eager"
            lines.append(
                f"H={r['shape']['hidden']:5d} {r['dtype']:8s} {r['mode']:7s} "
                f"{r['implementation']:10s} {how:5s} "
                f"{r['median_ms']:9.2f} ms  x{ratio or 1:.2f} torch  "
                f"mem {r.get('peak_memory_mb') or 0:.0f} MiB"
            )
        else:
            lines.append(f"{r}")
    ptb = summary.get("ptb_paper", {})
    if "speedup" in ptb:
        lines.append(
            f"ptb-paper: triton {ptb['triton']['tokens_per_s']:.0f} tok/s, old loop "
            f"{ptb['torch_loop']['tokens_per_s']:.0f} tok/s, x{ptb['speedup']:.1f}"
        )
    else:
        lines.append(f"ptb-paper: {ptb}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
