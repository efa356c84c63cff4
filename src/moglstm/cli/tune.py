"""``moglstm tune``: hyperparameter search with Optuna (and of dynamic evaluation)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from moglstm.cli.common import subparser
from moglstm.lm.errors import UserError
from moglstm.lm.runtime import DEVICE_HELP
from moglstm.lm.tune import (
    DRIVER_PACKAGES,
    DYNAMIC_GRAD_BATCHES,
    PRUNE_WARMUP,
    PRUNERS,
    format_trials,
    list_spaces,
    load_space,
    tune,
    tune_dynamic,
)

__all__ = ["add", "run"]

COMMAND = (  # the epilog is an f-string: the driver packages are written once
    "hyperparameter search (Optuna)",
    "Search hyperparameters with Optuna: every trial is a training run in the study's "
    "folder, poor trials are pruned from their validation curve.",
    f"""\
SPACE is a shipped search space (--list) or a YAML file:
  preset: ptb-small                  # base config (optional)
  overrides: [train.max_steps=3000]  # optional
  space:
    train.lr: {{logfloat: [1.0e-4, 1.0e-2]}}
    model.input_dropout: {{float: [0.0, 0.9]}}
    model.mogrifier.rounds: {{int: [0, 6]}}
    data.bptt: {{choice: [35, 70]}}
Kinds: float, logfloat, int, logint, choice. The study lives in
<out-dir>/<study>/: study.db (SQLite) and one run folder per trial
(trial-0007/, see `moglstm report`). Running the same command again resumes
the study; --trials N is the study's budget, counting every worker's trials.
Run it in several terminals for parallel workers sharing study.db, or on
several machines sharing a database (any SQLAlchemy URL, the same --study on
each machine): --storage postgresql://USER:PASSWORD@HOST/DB needs
pip install '{DRIVER_PACKAGES["psycopg"]}' (psycopg 3), or write
postgresql+psycopg2://... with pip install {DRIVER_PACKAGES["psycopg2"]};
mysql+pymysql://... needs pip install {DRIVER_PACKAGES["pymysql"]}. A trial whose
worker died is failed and retried (resuming its run folder) once its heartbeat
is stale.

Ctrl-C (or SIGTERM) stops the study after the running trial has saved its
checkpoint: that trial is marked failed and goes on from its last.pt when the
same command is run again. A second Ctrl-C quits at once. At the end a table
of the trials, best first, and the `moglstm train` command of the best values.

--dynamic RUN tunes dynamic evaluation (space 'dynamic' by default: dynamic.lr,
dynamic.decay) of a trained run on its validation split; the study is kept in
RUN/dynamic.db and the best settings are printed as an evaluate command.

examples:
  moglstm tune ptb-small --trials 20
  moglstm tune ptb-paper --trials 1000 --timeout 7d train.max_steps=30000
  moglstm tune my-space.yaml --trials 50 --pruner hyperband --study wide
  moglstm tune --dynamic runs/ptb-small --trials 30 --max-tokens 20000
""",
)


def add(sub: Any) -> None:
    """Add ``moglstm tune`` to the subcommands ``sub``."""
    p = subparser(sub, "tune", *COMMAND)
    p.add_argument("space", nargs="?", metavar="SPACE", help="shipped space name or YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--list", action="store_true", help="list the shipped search spaces")
    p.add_argument("--trials", type=int, metavar="N", help="the study's trial budget")
    p.add_argument("--timeout", metavar="TIME", help="time budget: 3600, 90m, 2h, 1d")
    p.add_argument("--study", metavar="NAME", help="study name (default: the space's)")
    p.add_argument("--out-dir", default="runs/tune", metavar="DIR", help="where studies live")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default: SQLite in the study)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="how poor trials stop early")
    p.add_argument(
        "--prune-startup", type=int, default=5, metavar="N", help="unpruned trials first"
    )
    p.add_argument(
        "--prune-warmup",
        type=int,
        default=PRUNE_WARMUP,
        metavar="N",
        help="validations of each trial that are never pruned",
    )
    p.add_argument("--seed", type=int, metavar="S", help="sampler seed")
    p.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--dynamic", metavar="RUN", help="tune dynamic evaluation of this run")
    p.add_argument("--batch-size", type=int, metavar="N", help="--dynamic: streams")
    p.add_argument("--max-tokens", type=int, metavar="N", help="--dynamic: validation tokens")
    p.add_argument(
        "--grad-batches",
        type=int,
        default=DYNAMIC_GRAD_BATCHES,
        metavar="N",
        help="--dynamic: training windows of the gradient statistics",
    )
    p.add_argument("--device", default="auto", help=f"--dynamic: {DEVICE_HELP}")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm tune``; prints the study's summary."""
    if args.list:
        for name in list_spaces():
            space = load_space(name)
            keys = ", ".join(p.key for p in space.params)
            print(f"{name:<22} [{space.preset or 'defaults'}] {keys}")
        return 0
    common = {"trials": args.trials, "timeout": args.timeout, "study": args.study}
    common |= {"storage": args.storage, "seed": args.seed, "heartbeat": args.heartbeat}
    if args.dynamic:
        if args.overrides:
            raise UserError(f"--dynamic takes no config overrides, got {args.overrides}")
        result = tune_dynamic(
            args.dynamic,
            args.space or "dynamic",
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            grad_batches=args.grad_batches,
            device=args.device,
            **common,
        )
    else:
        if args.space is None:
            raise UserError(f"give a search space: one of {', '.join(list_spaces())}, or a file")
        result = tune(
            args.space,
            overrides=args.overrides,
            out_dir=args.out_dir,
            pruner=args.pruner,
            prune_startup=args.prune_startup,
            prune_warmup=args.prune_warmup,
            **common,
        )
    _print(result, args.json)
    signal = result.get("interrupted")
    if signal is not None:
        print(
            f"moglstm tune: study {result['study']!r} stopped ({signal} received); the trial "
            "it ended is saved and goes on from its last.pt. Continue with: "
            f"{_same_command()}",
            file=sys.stderr,
        )
    return _SIGNAL_EXIT.get(signal, 0)


# the usual shell statuses of a process ended by these signals (the work is saved)
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def interrupted_note(args: argparse.Namespace) -> str:
    """What a second Ctrl-C during ``tune`` leaves behind, and how to go on."""
    return (
        " (the running trial is marked failed and keeps its last checkpoint). Continue "
        f"the study with: {_same_command()}"
    )


def _same_command() -> str:
    if sys.argv[1:2] == ["tune"]:
        return shlex.join(["moglstm", *sys.argv[1:]])
    return "the same moglstm tune command"


def _print(result: dict[str, Any], as_json: bool) -> None:
    """The summary: one JSON object, or counts, the table of trials and the command."""
    if as_json:
        print(json.dumps(result))
        return
    rows = result.get("trials", [])
    for key, value in result.items():
        if key in ("trials", "command", "interrupted") or value in (None, 0) and key != "complete":
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key}: {shown}")
    if rows:
        print()
        print(format_trials(rows))
    if result.get("command"):
        print()
        print("train the best values with:")
        print(f"  {result['command']}")
