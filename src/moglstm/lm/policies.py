"""Training policies: the optimiser, the learning-rate schedule, what a NaN loss does.

``train.schedule`` takes a name of :data:`SCHEDULES` (:class:`PlateauSchedule` runs
it); ``train.nonfinite`` a name of :data:`NONFINITE_POLICIES`: ``stop`` the run,
``skip`` the step (no update), or ``rollback`` to the last checkpoint with the learning
rate lowered by ``train.rollback_lr_factor``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from moglstm.lm.config import TrainConfig

__all__ = [
    "NONFINITE_POLICIES",
    "SCHEDULES",
    "NonFiniteLossError",
    "PlateauSchedule",
    "make_optimizer",
    "nonfinite_weights",
]

logger = logging.getLogger("moglstm.lm.train")

#: ``train.schedule``: constant, or decay on a validation plateau.
SCHEDULES = ("constant", "plateau")
#: ``train.nonfinite``: what a NaN/inf training loss does.
NONFINITE_POLICIES = ("stop", "skip", "rollback")


class NonFiniteLossError(RuntimeError):
    """The training (or validation) loss became NaN or infinite; the run stopped."""


def nonfinite_weights(model: nn.Module) -> str | None:
    """``None`` if every parameter of ``model`` is finite, else which is not and how much.

    A run checks this before each checkpoint: weights can diverge while the loss stays
    finite (an infinite forget bias saturates its gate), and a checkpoint of them would
    replace the last usable one.
    """
    bad = [(n, p) for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if not bad:
        return None
    name, p = bad[0]
    count = int((~torch.isfinite(p)).sum())
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    return f"{name} holds {count:,} NaN or infinite values of {p.numel():,}{more}"


class PlateauSchedule:
    r"""Learning rate that is constant, or decays when validation stops improving.

    With ``kind="plateau"`` the rate is multiplied by ``decay`` once ``patience``
    validations in a row (since the last improvement or decay) failed to lower the
    best validation loss; ``patience=0`` acts like 1. With ``kind="constant"`` the
    rate never changes, but the best loss and the number of validations without
    improvement are still tracked (for early stopping).

    Args:
        lr: the initial learning rate.
        kind: ``"constant"`` or ``"plateau"``.
        decay: factor in ``(0, 1]`` applied on a plateau.
        patience: validations without improvement before a decay.
    """

    def __init__(
        self, lr: float, *, kind: str = "constant", decay: float = 0.5, patience: int = 1
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"kind={kind!r} is not one of: {', '.join(SCHEDULES)}")
        if not lr > 0:
            raise ValueError(f"lr={lr!r} must be positive")
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay!r} must be in (0, 1]")
        if patience < 0:
            raise ValueError(f"patience={patience!r} must be >= 0")
        self.kind, self.decay, self.patience = kind, decay, patience
        self.lr = float(lr)
        self.best = math.inf  # best validation loss seen
        self.bad = 0  # validations since the best one
        self.since_decay = 0  # validations without improvement since the last decay

    def update(self, valid_loss: float) -> bool:
        """Record a validation loss; decay the rate if on a plateau. Returns ``improved``."""
        if valid_loss < self.best:
            self.best, self.bad, self.since_decay = valid_loss, 0, 0
            return True
        self.bad += 1
        self.since_decay += 1
        if self.kind == "plateau" and self.since_decay >= max(1, self.patience):
            self.lr *= self.decay
            self.since_decay = 0
            logger.info("validation loss has not improved: learning rate now %.3g", self.lr)
        return False

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers: ``lr``, ``best``, ``bad``, ``since_decay``."""
        return {"lr": self.lr, "best": self.best, "bad": self.bad, "since_decay": self.since_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.lr = float(state["lr"])
        self.best = float(state["best"])
        self.bad = int(state["bad"])
        self.since_decay = int(state["since_decay"])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or AdamW (decoupled weight decay) when ``cfg.weight_decay > 0``.

    Weight decay applies to matrices (embeddings and weights, ``dim >= 2``) only, not to
    biases and normalisation gains.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay == 0:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
