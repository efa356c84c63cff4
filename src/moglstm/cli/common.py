"""What every subcommand of the command line shares: the help layout, option types,
the subparser with ``--debug``, and how results are printed."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "POSITIVE",
    "HelpFormatter",
    "float_in",
    "int_at_least",
    "is_rank0",
    "print_results",
    "subparser",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' layout and shows every option's default in its help.

    An option whose help already says its default (``default: the run's``) is left
    as it is; flags show ``(default: off)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)".lstrip()
        value = action.default
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        return f"{text} (default: {value})".lstrip()


def subparser(
    sub: Any, name: str, help: str, description: str, epilog: str | None
) -> argparse.ArgumentParser:
    """A subcommand's parser, with ``--debug`` and a link back to itself for late errors."""
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(parser_=p)  # for errors found after parsing (see main)
    return p


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (the error names the option and value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be in {bracket}{low:g}, {high:g}], got {text}"
            )
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)


def print_results(results: dict[str, Any], as_json: bool) -> None:
    """A command's results: ``key: value`` lines, or one JSON object."""
    if as_json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key}: {shown}")


def is_rank0() -> bool:
    """Whether this process reports: not started by torchrun, or its rank 0."""
    from moglstm.lm.distributed import env_rank

    try:
        return env_rank() == 0
    except ValueError:  # a malformed $RANK: training reports it
        return True
