"""``moglstm report``: learning curves and a table comparing runs."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from moglstm.cli.common import subparser
from moglstm.lm.report import report

__all__ = ["add", "run"]

logger = logging.getLogger("moglstm.lm.report")

COMMAND = (
    "compare runs: learning curves and a table",
    "Plot and tabulate one or several training runs (finished or still training).",
    """\
Writes OUT.png and OUT.svg (validation perplexity or bits per character and
training loss, against steps and against wall-clock time, one line per run) and
OUT.md, the table that is also printed, best validation first: state (running,
done, early stop, time limit, interrupted, pruned, crashed) and, for a trial of
a `moglstm tune` study, its Optuna state and objective, the config keys in which
the runs differ, parameters, best and final validation, the latest test
evaluation (`moglstm evaluate --split test` records it in the run folder),
median training tokens/s and time. --csv and --json also write OUT.csv and
OUT.json, one row per run (--json prints it instead of the table). A folder of
run folders (a `moglstm tune` study) stands for all its runs; with many runs
the figure names and colours the best 8 and draws the rest faint. Wall-clock
panels compare machine load as much as runs: compare runs made on one idle
machine. The figure needs matplotlib: pip install 'moglstm[plot]'.

examples:
  moglstm report runs/ptb-small runs/ptb-small-lstm --out ptb-small
  moglstm report runs/tune/ptb-small --no-plot      # the table of a study's trials
""",
)


def add(sub: Any) -> None:
    """Add ``moglstm report`` to the subcommands ``sub``."""
    parser = subparser(sub, "report", *COMMAND)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or folders of runs)")
    parser.add_argument(
        "--out", default="report", metavar="PREFIX", help="files' path prefix (default: report)"
    )
    parser.add_argument("--title", help="the figure's title")
    parser.add_argument("--no-plot", action="store_true", help="the table alone (no matplotlib)")
    parser.add_argument("--csv", action="store_true", help="also write OUT.csv, a row per run")
    parser.add_argument(
        "--json", action="store_true", help="also write OUT.json; print it instead of the table"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm report``: print the table, write the files."""
    result = report(
        args.runs,
        args.out,
        plot=not args.no_plot,
        title=args.title,
        csv=args.csv,
        json_file=args.json,
    )
    if args.json:
        print(json.dumps(result["rows"]))
    else:
        print(result["table"], end="")
    for path in result["files"]:
        logger.info("wrote %s", path)
    return 0
