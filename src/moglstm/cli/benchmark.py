"""``moglstm benchmark``: time MogrifierLSTM against torch.nn.LSTM of the same shape."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from moglstm.benchmark import (
    BENCHMARKED,
    DEFAULT_GRID,
    DEFAULT_IMPLEMENTATIONS,
    DTYPES,
    MODES,
    parse_shape,
    run_benchmark,
    shape_spec,
)
from moglstm.cli.common import POSITIVE, int_at_least, subparser
from moglstm.lm.errors import UserError

__all__ = ["add", "epilog", "run"]

_EPILOG = """\
Times torch.nn.LSTM and MogrifierLSTM (reference and fused paths) of the same
shape in one process, interleaved, and prints the median milliseconds, the
ratio to torch.nn.LSTM, that ratio over the arithmetic floor 1 + r*k(I+H)/(4H(I+H))
(the Mogrifier's extra multiply-adds), tokens/s and the peak memory of a
training step. 'forward' is inference (no autograd); 'train' is forward +
backward. The default grid: {grid}.

examples:
  moglstm benchmark                                   # the default grid
  moglstm benchmark --shape B=64,T=70,H=512,L=2,r=5,k=84 --runs 20
  moglstm benchmark --shape B=16,H=256 --impl torch fused --mode train --json out.json
  moglstm benchmark --device cuda --dtype bfloat16 --shape B=64,T=70,H=1024,L=2,r=5,k=84
  moglstm benchmark --device cuda --dtype tf32 --impl torch triton
"""


def epilog() -> str:
    """The help's epilog; the default grid in it comes from the code."""
    base = DEFAULT_GRID[0]
    grid = [shape_spec(base), *(shape_spec(s, base) for s in DEFAULT_GRID[1:])]
    return _EPILOG.format(grid=", ".join(grid))


def add(sub: Any) -> None:
    """Add ``moglstm benchmark`` to the subcommands ``sub``."""
    p = subparser(
        sub,
        "benchmark",
        "time MogrifierLSTM against torch.nn.LSTM",
        "Time MogrifierLSTM against torch.nn.LSTM of the same shape.",
        epilog(),
    )
    p.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="SPEC",
        help="B=..,T=..,H=..,I=..,L=..,r=..,k=.. (k=none: full rank); repeatable "
        "(default: the grid below)",
    )
    defaults = "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_IMPLEMENTATIONS.items())
    p.add_argument(
        "--impl", nargs="+", choices=BENCHMARKED, help=f"default by device ({defaults})"
    )
    p.add_argument(
        "--mode", nargs="+", choices=MODES, default=list(MODES), help="what to time"
    )
    p.add_argument("--runs", type=POSITIVE, default=20, help="timed runs per implementation")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed runs first")
    p.add_argument("--device", type=_benchmark_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="tf32: float32, TF32 products"
    )
    p.add_argument(
        "--threads",
        type=POSITIVE,
        help="torch.set_num_threads before timing (default: torch's choice)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON here (default: no file)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm benchmark``; returns the exit status."""

    if args.json is not None:
        _check_writable(Path(args.json), "--json")  # before minutes of timing, not after
    _check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shape or list(DEFAULT_GRID)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    results = run_benchmark(
        shapes,
        args.impl,
        args.mode,
        runs=args.runs,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        memory=not args.no_memory,
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def _shape(text: str) -> Any:
    """argparse type of ``benchmark --shape``."""
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _benchmark_device(text: str) -> str:
    """argparse type of ``benchmark --device``: cpu, cuda or cuda:N, and present."""
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text  # whether the device is there is checked before timing (_check_device)


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available")
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(
            f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0-based)"
        )


def _check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder: give a file name")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {str(path)!r}: folder {str(path.parent)!r} does not exist")
