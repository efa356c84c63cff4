"""Checks of the arguments the library's functions take, written once.

For library callers, not configs (a config is checked as a whole by
:mod:`moglstm.lm.config.checks`): a wrong type is a ``TypeError``, a value out of range
a ``ValueError``, each naming the argument and the value, as ``torch.nn`` does. Plain
Python: the torch-only layers may import it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_int", "check_probability"]


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in ``[0, 1)`` (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)
