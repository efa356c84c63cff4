"""Stopping a training run early without losing work: signals and a wall-clock budget.

:class:`GracefulStop` turns the first SIGINT (Ctrl-C) or SIGTERM (``kill``, a job
scheduler's notice) into a request that the training loop reads after each step: it
finishes the step, saves ``last.pt`` at the step reached and returns. A second SIGINT or
SIGTERM raises :class:`KeyboardInterrupt` at once (nothing more is saved).

:func:`parse_duration` reads ``train.max_time`` (``"90m"``, ``"1h30m"``, ``"45s"``,
``"2h"``, or a number of seconds).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from moglstm.lm.errors import UserError

__all__ = ["GracefulStop", "StopRequested", "format_duration", "parse_duration"]

logger = logging.getLogger(__name__)

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PIECE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])", re.IGNORECASE)  # "90m", "1.5h"


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as ``"90m"``, ``"1h30m"``, ``"2h"``, ``"45s"`` or ``3600``.

    Units: ``d``, ``h``, ``m``, ``s``; a bare number is seconds. The result must be > 0.

    Raises:
        ValueError: the text is not a duration, or it is not positive.
    """
    if isinstance(text, bool):
        raise UserError(f"{text!r} is not a duration")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        compact = str(text).strip().replace(" ", "")
        try:
            seconds = float(compact)
        except ValueError:
            seconds = _sum_of_units(compact)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{text!r} must be a positive duration")
    return seconds


def _sum_of_units(text: str) -> float:
    pieces = _PIECE.findall(text)
    if not pieces or "".join(n + u for n, u in pieces).lower() != text.lower():
        raise UserError(
            f"{text!r} is not a duration; write e.g. 90m, 1h30m, 2h, 45s or a number of seconds"
        )
    return sum(float(n) * _UNITS[u.lower()] for n, u in pieces)


def format_duration(seconds: float) -> str:
    """``"1h05m"``, ``"12m30s"`` or ``"45s"``: a duration for people."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """The first SIGINT/SIGTERM, raised at a safe point of an interruptible block
    (:meth:`GracefulStop.interruptible`)."""


class GracefulStop:
    """While entered, the first SIGINT/SIGTERM sets :attr:`requested`; a second one aborts.

    Handlers are installed only in the main thread (Python delivers signals there); in
    another thread the context does nothing and :attr:`requested` stays ``None``. On
    exit the previous handlers are put back. Nested in another :class:`GracefulStop`
    (a study's trial inside the study), a request is the outer one's too.

    Attributes:
        requested: ``"SIGINT"`` or ``"SIGTERM"`` once a stop was asked for, else ``None``.
        handled_inside: the request came through a nested stop (which stops its own
            work first), not to this one directly.
    """

    _SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, what: str = "stopping after this step") -> None:
        self.requested: str | None = None
        self.handled_inside = False  # the request came through a nested stop, which acts on it
        self._what = what
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for name in self._SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}: stopped at once")
        self.requested = name
        outer = getattr(self._previous.get(number), "__self__", None)
        while isinstance(outer, GracefulStop) and outer.requested is None:
            # a stop nested in another (a study's trial in the study) asks both to stop
            outer.requested, outer.handled_inside = name, True
            outer = getattr(outer._previous.get(number), "__self__", None)
        key = "Ctrl-C" if name == "SIGINT" else name
        logger.warning("%s received: %s (%s again to quit at once)", name, self._what, key)
        # no exception from here: raised at an arbitrary bytecode it could cut a `finally`
        # (averaged weights half swapped back) in two; interruptible work polls instead

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block of long work that needs no saving (a validation, a temperature search):
        entering it after a signal raises :class:`StopRequested` at once; inside it, the
        work polls :attr:`requested` at safe points (between evaluation windows) and
        raises :class:`StopRequested` there, instead of running to its end."""
        if self.requested is not None:
            raise StopRequested(self.requested)
        yield
