"""Checks of the arguments the models' methods take at run time (sizes, tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_int", "check_tokens"]


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_tokens(tokens: Any) -> None:
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a LongTensor, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens must be a (T, B) LongTensor, got shape {tuple(tokens.shape)} "
            f"and dtype {tokens.dtype}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")


