"""What one dependent kernel and one grid-wide barrier cost on this GPU (for gpu_check.py).

The Triton backend's training step is a chain of about 1,800 short dependent kernels
(docs/gpu.md), so its speed with CUDA graphs hangs on the cost of one dependent kernel
inside a graph; the estimate assumes 1-3 us. A persistent single-launch design would pay
one grid-wide barrier instead per phase. This measures both, with trivial kernels:

- ``eager_launch_us``: a tiny Triton kernel launched from Python, each after the last;
- ``graph_kernel_us``: the same chain captured in one CUDA graph and replayed;
- ``grid_barrier_us``: one kernel of one program per SM, looping over barriers (an atomic
  counter and a spin); it needs every program resident at once, so it runs in a child
  process with a timeout (a hang costs the timeout, not the whole check).

    python benchmarks/latency_probe.py --json latency.json
    TRITON_INTERPRET=1 python benchmarks/latency_probe.py --dry-run   (plumbing, on CPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton
import triton.language as tl
from childproc import run_group  # beside this script


@triton.jit
def bump_kernel(x_ptr, N: tl.constexpr):
    """``x += 1`` on ``N`` elements: next to nothing, so its time is the launch's."""
    i = tl.arange(0, N)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)


@triton.jit
def barrier_kernel(counter_ptr, out_ptr, ROUNDS, PROGRAMS):
    """``ROUNDS`` grid-wide barriers: each program adds one to the counter, then spins
    until every program has (``PROGRAMS`` of them must be resident at once)."""
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    for r in range(ROUNDS):
        tl.atomic_add(counter_ptr, 1, sem="release")
        target = (r + 1) * PROGRAMS
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.store(out_ptr + tl.program_id(0), seen)


def chain(x: torch.Tensor, n: int) -> None:
    for _ in range(n):
        bump_kernel[(1,)](x, N=x.numel())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eager_launch_us(device: str, n: int) -> float:
    x = torch.zeros(32, device=device)
    chain(x, 3)  # compile
    sync(device)
    start = time.perf_counter()
    chain(x, n)
    sync(device)
    return (time.perf_counter() - start) / n * 1e6


def graph_kernel_us(n: int, replays: int = 5) -> float:
    x = torch.zeros(32, device="cuda")
    chain(x, 3)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(x, n)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] / n * 1e6


def barrier_us(device: str, programs: int, rounds: int) -> float:
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.zeros(programs, dtype=torch.int32, device=device)
    barrier_kernel[(programs,)](counter, out, 2, programs)  # compile
    sync(device)
    counter.zero_()
    start = time.perf_counter()
    barrier_kernel[(programs,)](counter, out, rounds, programs)
    sync(device)
    seconds = time.perf_counter() - start
    if int(counter.item()) != rounds * programs or int(out.min()) < rounds * programs:
        raise RuntimeError(f"barrier miscounted: {counter.item()} of {rounds * programs}")
    return seconds / rounds * 1e6


def barrier_in_child(timeout_s: float, dry: bool) -> dict:
    """:func:`barrier_us` in a child process: a grid that cannot all be resident hangs."""
    args = [sys.executable, __file__, "--barrier-only"] + (["--dry-run"] if dry else [])
    rc, out, err = run_group(args, timeout_s)  # its own process group, ended after
    if rc == "timeout":
        return {"error": f"no answer in {timeout_s:g} s (programs not all resident?)"}
    if rc != 0:
        return {"error": err.strip().splitlines()[-1:] or [f"rc {rc}"]}
    return json.loads(out.strip().splitlines()[-1])


def barrier_only(dry: bool) -> dict:
    if dry:  # one program: the interpreter runs programs one after another
        return {"grid_barrier_us": barrier_us("cpu", 1, 3), "programs": 1}
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    return {"grid_barrier_us": barrier_us("cuda", programs, 2000), "programs": programs}


def probe(dry: bool, timeout_s: float = 60.0) -> dict:
    """Every figure of the module docstring (the child's barrier figure or its error)."""
    device = "cpu" if dry else "cuda"
    n = 3 if dry else 2000
    out: dict = {"eager_launch_us": round(eager_launch_us(device, n), 2)}
    if not dry:
        out["graph_kernel_us"] = round(graph_kernel_us(n), 2)
    found = barrier_in_child(timeout_s, dry)
    out.update({k: round(v, 2) if isinstance(v, float) else v for k, v in found.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--dry-run", action="store_true", help="CPU plumbing check (interpreter)")
    parser.add_argument("--barrier-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run under TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    result = barrier_only(args.dry_run) if args.barrier_only else probe(args.dry_run)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
