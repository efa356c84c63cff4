"""Argument checks shared by the modules: each error names the argument and its value."""

from __future__ import annotations

import torch
from torch import Tensor


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_rounds(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_rank(name: str, rank: object, input_size: int, hidden_size: int) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int or None, got {rank!r} ({type(rank).__name__})")
    limit = min(input_size, hidden_size)
    if not 0 < rank < limit:
        raise ValueError(
            f"{name} must be in [1, min(input_size, hidden_size) - 1] = [1, {limit - 1}], "
            f"got {rank!r}: a rank of {limit} or more is no cheaper than a full matrix"
        )
    return rank


def check_proj_size(proj_size: object, hidden_size: int) -> int:
    """torch.nn.LSTM's ``proj_size``: 0 (no projection) up to ``hidden_size - 1``."""
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(f"proj_size must be an int, got {proj_size!r}")
    if not 0 <= proj_size < hidden_size:
        raise ValueError(
            f"proj_size must be in [0, hidden_size) = [0, {hidden_size}), got {proj_size!r}"
        )
    return proj_size


def check_probability(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    return value


def check_like(name: str, value: Tensor, ref: Tensor, ref_name: str) -> None:
    """Same dtype and device as ``ref`` (no silent casts or transfers)."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has dtype {ref.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def check_shape(name: str, value: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected}, got {tuple(value.shape)} "
            "(states are never broadcast)"
        )


def check_floating(name: str, value: Tensor) -> None:
    if not torch.is_floating_point(value):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
