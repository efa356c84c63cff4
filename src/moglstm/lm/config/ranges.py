"""The range of every float key of the config, written once: checks and docs come from here.

A float that is finite can still be one no run can train with: a ``model.forget_bias``
beyond float32 becomes ``inf`` in the weights, an ``lr`` of ``1e308`` overflows the first
update, a ``train.dist_timeout`` of ``1e308`` seconds overflows a ``timedelta`` and one of
``1e-320`` times out at once. :data:`FLOAT_RANGES` gives each float key of
:mod:`moglstm.lm.config.schema` a finite interval (and why, where it is not obvious);
:func:`range_problems` checks a config section against it, and :func:`describe_ranges`
writes the table docs/reliability.md shows. A test checks that every float field of the
schema has a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["FLOAT_RANGES", "FloatRange", "describe_ranges", "range_problems"]

_FLOAT32_SAFE = 1e38  # the largest power of ten below float32's largest value (3.4e38)


@dataclass(frozen=True)
class FloatRange:
    """A closed or half-open interval ``[low, high]`` (``low_open``: ``(low, high]``, ...)."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def text(self) -> str:
        """``[0, 1)``, ``(0, 1e+38]``, ..."""
        return (
            f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}"
        )


_FRACTION = FloatRange(0.0, 1.0, high_open=True, why="a probability")
_FACTOR = FloatRange(0.0, 1.0, low_open=True, why="a factor that lowers the rate")
_INIT = FloatRange(0.0, 1e4, low_open=True, why="a variance scale")

#: Every float key of the config (dotted, as overrides write it) and its range.
FLOAT_RANGES: dict[str, FloatRange] = {
    "model.embedding_dropout": _FRACTION,
    "model.input_dropout": _FRACTION,
    "model.layer_dropout": _FRACTION,
    "model.state_dropout": _FRACTION,
    "model.output_dropout": _FRACTION,
    "model.drop_state_probability": _FRACTION,
    "model.forget_bias": FloatRange(
        -1e4, 1e4, why="past about 20 the forget gate is already 0 or 1 in float32"
    ),
    "model.embedding_init_factor": _INIT,
    "model.cell_init_factor": _INIT,
    "model.output_init_factor": _INIT,
    "model.embedding_ratio": FloatRange(0.0, 1e3, low_open=True, why="embedding / hidden size"),
    "model.transformer.dropout": _FRACTION,
    "model.output.mos_dropout": _FRACTION,
    "model.output.projection_dropout": _FRACTION,
    "train.lr": FloatRange(
        0.0, _FLOAT32_SAFE, low_open=True, why="a larger rate overflows float32 weights"
    ),
    "train.betas": FloatRange(0.0, 1.0, high_open=True, why="each of Adam's two decay rates"),
    "train.eps": FloatRange(1e-30, 1.0, why="smaller vanishes in float32 and divides by zero"),
    "train.weight_decay": FloatRange(0.0, 1e4),
    "train.clip": FloatRange(0.0, _FLOAT32_SAFE, why="0 disables clipping"),
    "train.lr_decay": FloatRange(0.0, 1.0, low_open=True, why="1 never lowers the rate"),
    "train.l2": FloatRange(0.0, 1e4),
    "train.rollback_lr_factor": _FACTOR,
    "train.dist_timeout": FloatRange(1.0, 7 * 24 * 3600.0, why="seconds: one second to a week"),
}


def range_problems(section: Any, prefix: str) -> list[str]:
    """One message per float of ``section`` (a config dataclass whose keys start with
    ``prefix``, e.g. ``"train."``) outside its range in :data:`FLOAT_RANGES`."""
    problems = []
    for key, bounds in FLOAT_RANGES.items():
        owner, _, name = key.rpartition(".")
        if owner + "." != prefix or not hasattr(section, name):
            continue
        values = getattr(section, name)
        many = isinstance(values, tuple)
        for i, value in enumerate(values if many else (values,)):
            label = f"{key}[{i}]" if many else key
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                problems += _problem(label, float(value), value, bounds)
    return problems


def _problem(label: str, value: float, shown: Any, bounds: FloatRange) -> list[str]:
    if not math.isfinite(value):
        return [f"{label}={shown!r} must be finite"]
    if value in bounds:
        return []
    if bounds.low == 0 and bounds.high > 1 and value <= 0 and (bounds.low_open or value < 0):
        return [f"{label}={shown!r} must be {'positive' if bounds.low_open else '>= 0'}"]
    why = f" ({bounds.why})" if bounds.why else ""
    return [f"{label}={shown!r} must be in {bounds.text()}{why}"]


def describe_ranges() -> str:
    """The table of :data:`FLOAT_RANGES` as Markdown (docs/reliability.md holds a copy)."""
    lines = ["| key | range | why |", "|---|---|---|"]
    lines += [f"| `{k}` | {r.text()} | {r.why} |" for k, r in FLOAT_RANGES.items()]
    return "\n".join(lines)
