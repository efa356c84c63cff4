"""Checks of the arguments the models' methods take at run time (sizes, tokens).

``check_int`` is :func:`moglstm.lm.arguments.check_int`, re-exported for the models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moglstm.lm.arguments import check_int

__all__ = ["check_int", "check_tokens"]


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


