"""``moglstm train``: train a language model from a preset and overrides, or resume one."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moglstm.cli.common import is_rank0, print_results, subparser
from moglstm.lm.config import (
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    load_preset,
    to_yaml,
)
from moglstm.lm.errors import UserError
from moglstm.lm.runs.folder import RESUMABLE_KEYS, resume_config

__all__ = ["QUICKSTART", "add", "epilog", "interrupted_note", "run"]

#: The preset ``moglstm train`` trains when given neither a preset nor a corpus.
QUICKSTART = "quickstart"

_EPILOG = """\
Overrides are dotted KEY=VALUE items applied after the preset, values in YAML
syntax, e.g. model.hidden_size=650 train.betas=[0,0.999] data.corpus=ptb-char;
they may come before, between or after the options. Without --preset the base
is the quickstart preset, or the built-in defaults when the overrides choose a
corpus (data.corpus=...). `moglstm presets NAME` shows every key.
The run folder <out_dir>/<name>/ gets config.yaml, metrics.jsonl, best.pt and
last.pt; a new run never overwrites an existing run folder.

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves last.pt
at the step reached and says how to resume; a second Ctrl-C quits at once.
train.max_time=90m (or 1h30m, 45s, ...) stops cleanly within that wall-clock
time, final validation and checkpoint included.

The same command and seed on the same machine give the same bits, busy or
idle: train.threads fixes the CPU threads for the run (default: one per core;
another count changes the last bits).

--resume continues a stopped run from its last.pt with the checkpoint's config,
bit for bit on CPU (runs written by earlier versions too: old key names such as
model.mogrify_rounds still work). Only these may be overridden when resuming:
{resumable}.

examples:
  moglstm train                                      # quickstart: runs/quickstart
  moglstm train --preset ptb-small
  moglstm train --preset ptb-small --name wide model.hidden_size=300
  moglstm train data.corpus=text data.path=my_corpus/ --name mine train.max_steps=30
  moglstm train data.corpus=text data.path=my_corpus/ data.level=char --name mine-char
  moglstm train --preset ptb-small train.max_time=90m
  moglstm train --preset ptb-small --resume train.max_steps=8000
  moglstm train --resume runs/wide                   # a run folder, anywhere
  moglstm train --preset ptb-small --print-config    # show the resolved config
  torchrun --nproc_per_node=4 -m moglstm train --preset ptb-small   # 4 GPUs, data-parallel

Under torchrun each process takes data.batch_size / N of the streams (the batch
size must divide by N) and only rank 0 writes files; a dead or stalled process
stops the others after train.dist_timeout seconds ({dist_timeout:g}). train.nonfinite=skip or
rollback keeps a run going through a NaN/inf loss (default: {nonfinite}). A model whose
training cannot fit in memory is refused before it is built, with the numbers
(train.check_memory=false tries anyway). See docs/reliability.md.
"""


def epilog() -> str:
    """The help's epilog; the lists and defaults in it come from the code."""
    resumable = textwrap.fill(", ".join(sorted(RESUMABLE_KEYS)), 79, break_on_hyphens=False)
    t = TrainConfig()
    return _EPILOG.format(resumable=resumable, dist_timeout=t.dist_timeout, nonfinite=t.nonfinite)


def add(sub: Any) -> None:
    """Add ``moglstm train`` to the subcommands ``sub``."""
    p = subparser(
        sub,
        "train",
        "train a language model",
        "Train a language model from a preset and/or KEY=VALUE overrides, saving "
        "checkpoints and metrics in <out_dir>/<name>/.",
        epilog(),
    )
    p.add_argument(
        "--preset",
        metavar="NAME|PATH",
        help="shipped preset (see `moglstm presets`) or YAML file (default: "
        f"{QUICKSTART}, the bundled Shakespeare corpus, about 10 minutes on 2 CPU cores; "
        "with a data.corpus override, the built-in defaults)",
    )
    p.add_argument("--name", help="run name: the run folder's name (default: the preset's)")
    p.add_argument(
        "--out-dir",
        metavar="DIR",
        help=f"folder holding run folders (default: {RunConfig().out_dir})",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the run <out_dir>/<name> (or the run folder RUN) from its last.pt "
        "(default: off, a new run)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm train``; returns the exit status."""
    from moglstm.lm.train import train  # the training loop's imports, for this command only

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse took the first override for the optional RUN
        args.overrides.insert(0, args.resume)
        args.resume = True
    if args.resume:
        overrides = _without_location(args.overrides)
        # a preset named with --resume must describe the run being resumed
        preset = None if args.preset is None else load_config(args.preset, overrides)
        cfg = resume_config(_resume_dir(args), overrides, preset)
    else:
        cfg = load_config(_preset(args), [*args.overrides, *_location_overrides(args)])
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    args.run_dir = Path(cfg.out_dir) / cfg.name  # for the message if interrupted
    results = train(cfg, resume=bool(args.resume), quiet=args.quiet)
    if not is_rank0():  # under torchrun, one copy of the (identical) results
        return 0
    print_results(results, args.json)
    stopped, step = results["stopped"], results["step"]
    if stopped in ("SIGINT", "SIGTERM", "max_time"):
        why = "train.max_time ran out" if stopped == "max_time" else f"{stopped} received"
        print(
            f"moglstm train: stopped at step {step} ({why}); last.pt holds it. "
            f"Continue with: {_resume_command(args.run_dir)}",
            file=sys.stderr,
        )
    return _SIGNAL_EXIT.get(stopped, 0)


# the usual shell statuses of a process ended by these signals (the work is saved)
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _resume_command(run_dir: Path) -> str:
    return f"moglstm train --resume {shlex.quote(str(run_dir))}"


def interrupted_note(args: argparse.Namespace) -> str:
    """What a second Ctrl-C during ``train`` leaves behind, and how to go on."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:
        return ""
    if not (run_dir / "last.pt").is_file():
        return " before the first checkpoint: nothing was saved"
    return f"; last.pt is kept. Continue with: {_resume_command(run_dir)}"


def _preset(args: argparse.Namespace) -> str | None:
    """``--preset``; without it the quick start, unless the overrides choose a corpus
    (then the built-in defaults are the base, as in :func:`~moglstm.lm.config.load_config`)."""
    if args.preset is not None:
        return args.preset
    keys = {item.partition("=")[0].strip() for item in args.overrides}
    return None if keys & {"data", "data.corpus"} else QUICKSTART


def _location_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.name is not None:
        out.append(f"name={args.name}")
    if args.out_dir is not None:
        out.append(f"out_dir={args.out_dir}")
    return out


def _is_location(item: str) -> bool:
    return item.partition("=")[0].strip() in ("name", "out_dir")


def _without_location(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not _is_location(o)]


def _resume_dir(args: argparse.Namespace) -> Path:
    """The run folder to resume: ``--resume RUN``, else ``<out_dir>/<name>``."""
    location = [o for o in args.overrides if _is_location(o)] + _location_overrides(args)
    if isinstance(args.resume, str):
        if location:
            raise UserError(
                "give either --resume RUN or --name/--out-dir (name=/out_dir=), not both"
            )
        return Path(args.resume)
    preset = _preset(args)
    base = RunConfig() if preset is None else load_preset(preset)
    base = apply_overrides(base, location)
    return Path(base.out_dir) / base.name
