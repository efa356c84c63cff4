"""The ``moglstm`` command line: one small module per command, this one dispatches.

A thin layer over :mod:`moglstm.lm` (and :mod:`moglstm.benchmark`): every subcommand's
module (``moglstm.cli.train``, ``.evaluate``, ``.generate``, ``.presets``,
``.benchmark``, ``.report``, ``.tune``) adds its parser (``add``) and runs it (``run``),
calling one function of the library. Bad input raises a
:class:`~moglstm.lm.errors.UserError` where it is found; :func:`main` prints it as one
line on stderr with exit status 2 (``--debug`` shows the traceback instead). Anything
else is a bug and shows its traceback. ``train``'s dotted ``KEY=VALUE`` overrides may
stand anywhere among its options; every option's help shows its default; a bare
``moglstm`` lists the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from moglstm.cli import benchmark as benchmark_command
from moglstm.cli import evaluate as evaluate_command
from moglstm.cli import generate as generate_command
from moglstm.cli import presets as presets_command
from moglstm.cli import report as report_command
from moglstm.cli import train as train_command
from moglstm.cli import tune as tune_command
from moglstm.cli.common import HelpFormatter, is_rank0
from moglstm.cli.train import QUICKSTART
from moglstm.lm.errors import UserError

__all__ = ["COMMANDS", "QUICKSTART", "USER_ERRORS", "build_parser", "main"]

logger = logging.getLogger("moglstm")

#: The subcommands' modules, in the order ``moglstm --help`` lists them.
COMMANDS = (
    train_command,
    evaluate_command,
    generate_command,
    presets_command,
    benchmark_command,
    report_command,
    tune_command,
)

#: Errors printed as one line with exit status 2: bad input, found where it was given.
#: The OS errors are those of a path the user named (a missing file, a folder where a
#: file was wanted); a bare ValueError or TypeError is a bug and shows its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)

_MAIN_EPILOG = """\
examples:
  moglstm train                                     # the quick start: bundled Shakespeare,
                                                    # about 10 minutes on 2 CPU cores
  moglstm generate runs/quickstart --prompt "ROMEO ." --tokens 60 --top-p 0.9
  moglstm presets                                   # what else can be trained
  moglstm train --preset ptb-small                  # train into runs/ptb-small/
  moglstm train --preset ptb-small model.hidden_size=300 train.max_steps=2000
  moglstm train --preset ptb-small --resume         # continue runs/ptb-small/
  moglstm evaluate runs/ptb-small --split test --batch-size 1

The shakespeare corpus ships with the package. The others are read from
data.data_dir, else $MOGLSTM_DATA, else downloaded to ~/.cache/moglstm.
Run `moglstm COMMAND --help` for each command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``moglstm`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="moglstm",
        description="Mogrifier LSTM language models: train, evaluate and sample from them.",
        epilog=_MAIN_EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    return parser


def _version() -> str:
    from moglstm import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moglstm`` command line; returns the exit status.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:  # a bare `moglstm`: what can it do?
        parser.print_help()
        return 0
    if extras:
        _take_overrides(args, extras)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    quiet = getattr(args, "quiet", False) or not is_rank0()  # torchrun: rank 0 reports
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _take_overrides(args: argparse.Namespace, extras: list[str]) -> None:
    """KEY=VALUE items argparse left over (after an option) join ``train``'s overrides;
    anything else is an error of the subcommand (its usage, not the top level's)."""
    unknown = [
        e for e in extras if not (hasattr(args, "overrides") and _looks_like_override(e))
    ]
    if unknown:
        hint = ""
        if hasattr(args, "overrides") and any(e.startswith("--") and "." in e for e in unknown):
            hint = " (config keys are given as KEY=VALUE, e.g. train.max_steps=100, no dashes)"
        args.parser_.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.overrides.extend(extras)


def _looks_like_override(item: str) -> bool:
    key, sep, _ = item.partition("=")
    return bool(sep and key) and not item.startswith("-")


def _run(args: argparse.Namespace) -> int:
    from moglstm.lm.budget import allocation_failure
    from moglstm.lm.distributed import PeerLostError
    from moglstm.lm.policies import NonFiniteLossError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        notes = {"train": train_command.interrupted_note, "tune": tune_command.interrupted_note}
        note = notes[args.command](args) if args.command in notes else ""
        print(f"moglstm {args.command}: interrupted{note}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"moglstm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, PeerLostError, OSError) as exc:
        if args.debug:
            raise
        print(f"moglstm {args.command}: failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        message = allocation_failure(exc, args.command)
        if message is None or args.debug:
            raise  # not an allocation: an internal error shows its traceback
        print(f"moglstm {args.command}: failed: {message}", file=sys.stderr)
        return 1


_MAX_MESSAGE = 2000  # characters of an error shown: messages never grow with the input


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    text = f"{head} {'; '.join(rest)}" if head.endswith(":") and rest else "; ".join(lines)
    if len(text) > _MAX_MESSAGE:
        text = f"{text[: _MAX_MESSAGE - 40]}... ({len(text) - _MAX_MESSAGE + 40:,} more characters)"
    return text
