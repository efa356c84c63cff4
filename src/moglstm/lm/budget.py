"""Parameter budgets: compare models at equal size, as the Mogrifier paper does.

``model.num_params=24M`` asks for the largest hidden size whose model has at most
24 million parameters. This module holds the two model-independent pieces:

* :func:`parse_count` reads a count written as ``"24M"``, ``"24e6"``, ``"2.4e7"`` or
  ``24000000``;
* :func:`largest_fitting` is the search: given ``count(size)`` (the number of
  parameters of the model of that size, or ``None`` where that size cannot be built)
  it finds the largest size whose count fits the budget.

:func:`moglstm.lm.models.build_model` counts a candidate by building it on the
``meta`` device (no memory is allocated), so every architecture option is counted
exactly as it will be built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = ["largest_fitting", "parse_count"]

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_COUNT_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*", re.IGNORECASE)


def parse_count(value: str | int | float) -> int:
    """Read a parameter count: ``"24M"``, ``"1.5k"``, ``"24e6"``, ``24000000`` or ``2.4e7``.

    Suffixes ``k``, ``M`` and ``G`` (or ``B``) are powers of 1000, case-insensitive.

    Args:
        value: the count, as text or a number.

    Returns:
        The count as a positive int.

    Raises:
        ValueError: the text is not a count, or the count is not a positive whole number.
        TypeError: ``value`` is neither text nor a number.

    Example::

        >>> parse_count("24M"), parse_count("24e6"), parse_count(24_000_000)
        (24000000, 24000000, 24000000)
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"count: expected text like '24M' or a number, got {value!r}")
    if isinstance(value, str):
        match = _COUNT_RE.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a parameter count (write e.g. 24M, 1.5k, 24e6 or 24000000)"
            )
        number = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    else:
        number = float(value)
    if not math.isfinite(number) or number < 1 or abs(number - round(number)) > 1e-6 * number:
        raise ValueError(f"{value!r} must be a positive whole number of parameters")
    return int(round(number))


def largest_fitting(count: Callable[[int], int | None], budget: int, *, high: int = 1 << 16) -> int:
    """The largest ``size`` in ``[1, high]`` with ``count(size) <= budget``.

    ``count`` must grow with ``size``, and return ``None`` for sizes too small to be
    built (e.g. a hidden size not above a mogrifier rank); sizes that can be built
    must form a range ``[smallest, high]``. Binary searches: about ``2 log2(high)``
    calls.

    Args:
        count: the number of parameters of the model of a given size, or ``None``.
        budget: the largest number of parameters allowed.
        high: the largest size considered.

    Raises:
        ValueError: no size fits (even the smallest buildable one is over budget), or
            no size up to ``high`` can be built.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if isinstance(high, bool) or not isinstance(high, int) or high < 1:
        raise ValueError(f"high must be a positive int, got {high!r}")
    smallest = _first(lambda n: count(n) is not None, 1, high)
    if smallest is None:
        raise ValueError(f"no size up to {high} can be built")
    least = count(smallest)
    if least > budget:
        raise ValueError(
            f"a budget of {budget:,} parameters is too small: the smallest model "
            f"(size {smallest}) has {least:,}"
        )
    too_big = _first(lambda n: count(n) > budget, smallest, high)
    return high if too_big is None else too_big - 1


def _first(pred: Callable[[int], bool], low: int, high: int) -> int | None:
    """Smallest ``n`` in ``[low, high]`` with ``pred(n)``, for ``pred`` false-then-true."""
    if not pred(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if pred(mid):
            high = mid
        else:
            low = mid + 1
    return low
