"""The recurrent state a language model carries between windows, and one walk over it.

A state is ``None``, a tensor, or tuples (named tuples included), lists and dicts of
states, nested freely; every model of :mod:`moglstm.lm.models` returns one. Every
function that touches a state's tensors (detaching, moving, dropping streams,
splitting into sub-batches, gathering across processes) goes through
:func:`map_state`, so they all agree on what a state may hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["State", "cat_states", "detach_state", "map_state", "split_state", "state_tensors"]

#: A model's recurrent state: None, a tensor, or (nested) tuples/lists/dicts of tensors.
State = Any


def map_state(state: State, fn: Callable[[Tensor], Any]) -> State:
    """``state`` with ``fn`` applied to every tensor, its structure kept.

    ``None`` stays ``None``; named tuples are rebuilt field by field.

    Raises:
        TypeError: ``state`` holds something that is not a state (named in the message).
    """
    if state is None:
        return None
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, tuple):
        parts = [map_state(s, fn) for s in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    if isinstance(state, list):
        return [map_state(s, fn) for s in state]
    if isinstance(state, Mapping):
        return {k: map_state(v, fn) for k, v in state.items()}
    raise TypeError(f"unsupported state type {type(state).__name__}")


def state_tensors(state: State) -> Iterator[Tensor]:
    """The tensors of ``state`` in order (depth first)."""
    found: list[Tensor] = []
    map_state(state, found.append)
    return iter(found)


def detach_state(state: State) -> State:
    r"""Cut the autograd history of a model state, keeping its structure.

    So truncated backpropagation can carry state from one window to the next without
    knowing the model type.

    Args:
        state: the state returned by a model's ``forward``.

    Returns:
        The same structure with every tensor detached (``None`` stays ``None``).
    """
    try:
        return map_state(state, Tensor.detach)
    except TypeError as exc:
        raise TypeError(f"detach_state: {exc}") from None


def split_state(state: State, sizes: list[int]) -> list[State]:
    """One state per sub-batch: every tensor split along its batch dimension (1)."""
    if state is None:
        return [None] * len(sizes)
    if len(sizes) == 1:
        return [state]
    pieces = [t.split(sizes, 1) for t in state_tensors(state)]
    return [_rebuild(state, iter([p[i] for p in pieces])) for i in range(len(sizes))]


def cat_states(states: list[State]) -> State:
    """Inverse of :func:`split_state`: the sub-batches' states joined along dimension 1."""
    first = states[0]
    if len(states) == 1 or first is None:
        return first
    columns = zip(*(list(state_tensors(s)) for s in states), strict=True)
    return _rebuild(first, iter([torch.cat(list(c), 1) for c in columns]))


def _rebuild(template: State, tensors: Iterator[Tensor]) -> State:
    """``template``'s structure with its tensors replaced, in order, by ``tensors``."""
    return map_state(template, lambda _: next(tensors))
