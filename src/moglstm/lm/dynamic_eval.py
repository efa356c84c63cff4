"""Dynamic evaluation (Krause et al., 2018), the RMS variant of the official Mogrifier code.

A trained model keeps learning while it is scored: the evaluated split is read in
short windows, and after each window has been scored with the current weights
those weights take one gradient step on it, so the model adapts to the recent
text (topics, names, style). Each step is normalised by the root mean square of
the gradients measured on the training split, and pulled back towards the
trained weights::

    ms      = mean over training windows of g**2          (once, before evaluation)
    rms     = sqrt(ms)
    for each window of the split:
        score it with theta                               (the reported loss)
        theta -= lr * g / (rms + eps)                     g: the window's gradient
        theta += min(1, decay * rms / mean(rms)) * (theta_trained - theta)

``mean(rms)`` is the mean over every parameter element. Parameters whose
gradients are large on the training data are thus pulled back harder. The loss
behind ``g`` (and ``ms``) is the mean token cross-entropy of a window.

:func:`gradient_statistics` computes ``ms``; :func:`dynamic_evaluate` scores a split.
Both leave the model's weights as they found them. ``moglstm evaluate RUN --dynamic``
runs the two (see :class:`DynamicEvalSettings` for the options and defaults).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moglstm.lm.data import iter_windows
from moglstm.lm.errors import UserError
from moglstm.lm.models import softmax_temperature
from moglstm.lm.progress import ScoreProgress
from moglstm.lm.state import detach_state

__all__ = ["DynamicEvalSettings", "dynamic_evaluate", "gradient_statistics"]

logger = logging.getLogger(__name__)


@dataclass
class DynamicEvalSettings:
    """Options of dynamic evaluation (``moglstm evaluate --dynamic-*``).

    Attributes:
        lr: step size of the RMS-normalised update (``--dynamic-lr``). The step is
            ``lr * g / (rms + eps)`` with ``g`` the gradient of a window's mean loss.
        decay: pull back towards the trained weights (``--dynamic-decay``, the paper's
            lambda); ``0`` never pulls back.
        eps: added to the RMS in the update's denominator (``--dynamic-eps``).
        bptt: window length: tokens scored between two updates (``--dynamic-bptt``).
        grad_batches: training windows (of the run's batch size and window length)
            over which the mean squared gradients are taken; ``None`` for the whole
            training split (``--dynamic-grad-batches``).

    The defaults were the best of a small grid on a CPU-trained PTB model (3M
    parameters, see docs/reproduce.md); tune ``lr`` and ``decay`` on the validation
    split for a new model. ``eps`` bounds the step of parameters that barely moved
    on the training data (rare words' embeddings): with ``1e-5`` a rate of ``1e-4``
    already diverged there.
    """

    lr: float = 3e-5
    decay: float = 1e-3
    eps: float = 1e-4
    bptt: int = 5
    grad_batches: int | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"dynamic {name}: expected a float, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"dynamic {name}={value!r} must be positive")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)):
            raise TypeError(f"dynamic decay: expected a float, got {self.decay!r}")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise UserError(f"dynamic decay={self.decay!r} must be >= 0")
        for name in ("bptt", "grad_batches"):
            value = getattr(self, name)
            if value is None and name == "grad_batches":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"dynamic {name}: expected an int, got {value!r}")
            if value < 1:
                raise UserError(f"dynamic {name}={value} must be >= 1")


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    # parameters() yields a tied tensor once, so it is updated once per step
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def _weights_kept(model: nn.Module) -> Iterator[list[Tensor]]:
    """Yield copies of the weights; put them back into the model afterwards."""
    saved = [p.detach().clone() for p in _parameters(model)]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for p, s in zip(_parameters(model), saved, strict=True):
                p.copy_(s)
                p.grad = None


def _window_loss(model: nn.Module, inputs: Tensor, targets: Tensor, state, temperature: float):
    with softmax_temperature(model, temperature) as inside:  # a mixture: per component
        logits, state = model(inputs, state)  # (T, B, V)
    flat = logits.float().reshape(-1, logits.size(-1))
    if not inside:
        flat = flat / temperature
    return F.cross_entropy(flat, targets.reshape(-1), reduction="sum"), detach_state(state)


def gradient_statistics(
    model: nn.Module,
    data: Tensor,
    bptt: int,
    *,
    max_batches: int | None = None,
    progress: ScoreProgress | None = None,
) -> list[Tensor]:
    r"""Mean squared gradient of every parameter over windows of a (training) split.

    The model runs in eval mode (no dropout), carrying its state across windows;
    each window's gradient is that of its mean token cross-entropy.

    Args:
        model: a language model (its weights are not changed).
        data: ``(N, B)`` batchified token ids on the model's device.
        bptt: window length.
        max_batches: use only the first this many windows; ``None`` for all.
        progress: a :class:`~moglstm.lm.progress.ScoreProgress` to advance per window.

    Returns:
        One tensor per parameter (in ``model.parameters()`` order, tied ones once),
        shaped like it: the mean of the squared gradients.
    """
    if max_batches is not None and max_batches < 1:
        raise UserError(f"max_batches={max_batches} must be >= 1")
    model.eval()
    params = _parameters(model)
    ms = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    windows = 0
    state = None
    for inputs, targets in iter_windows(data, bptt):
        if max_batches is not None and windows >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        loss, state = _window_loss(model, inputs, targets, state, 1.0)
        (loss / targets.numel()).backward()
        if progress is not None:
            progress.update(targets.numel(), loss.detach())
        with torch.no_grad():
            for m, p in zip(ms, params, strict=True):
                if p.grad is not None:
                    m.add_(p.grad.float().square())
        windows += 1
    model.zero_grad(set_to_none=True)
    if windows == 0:
        raise UserError(f"data: no window to take gradients on in shape {tuple(data.shape)}")
    return [m.div_(windows) for m in ms]


def dynamic_evaluate(
    model: nn.Module,
    data: Tensor,
    ms: list[Tensor],
    settings: DynamicEvalSettings | None = None,
    *,
    temperature: float = 1.0,
    max_tokens: int | None = None,
    progress: ScoreProgress | None = None,
) -> tuple[float, int]:
    r"""Score a split with dynamic evaluation; return ``(mean loss in nats, tokens scored)``.

    Every window is scored before the model learns from it, so no token is scored
    by weights that have seen it. The model's weights are restored afterwards.

    Args:
        model: a trained language model.
        data: ``(N, B)`` batchified token ids (batch size 1 is the paper's protocol).
        ms: the mean squared gradients from :func:`gradient_statistics`.
        settings: step size, decay, epsilon and window length.
        temperature: the logits are divided by this when scoring (and in the loss
            that is differentiated).
        max_tokens: score only about this many tokens; ``None`` for the whole split.
        progress: a :class:`~moglstm.lm.progress.ScoreProgress` to advance per window.
    """
    settings = settings or DynamicEvalSettings()
    params = _parameters(model)
    if len(ms) != len(params) or any(m.shape != p.shape for m, p in zip(ms, params, strict=False)):
        raise UserError("ms: expected one tensor per parameter, shaped like it")
    model.eval()
    rms = [m.sqrt().to(p.dtype) for m, p in zip(ms, params, strict=True)]
    mean_rms = sum(r.sum().item() for r in rms) / sum(r.numel() for r in rms)
    if mean_rms == 0:
        raise UserError("ms: every mean squared gradient is zero")
    # per element: the fraction of the way back to the trained weights, each step
    pull = [(settings.decay * r / mean_rms).clamp_(max=1.0) for r in rms]
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    count = 0
    with _weights_kept(model) as trained:
        state = None
        for inputs, targets in iter_windows(data, settings.bptt, max_tokens=max_tokens):
            model.zero_grad(set_to_none=True)
            loss, state = _window_loss(model, inputs, targets, state, temperature)
            total += loss.detach().double()
            count += targets.numel()
            if progress is not None:
                progress.update(targets.numel(), loss.detach())
            (loss / targets.numel()).backward()
            _update(params, rms, pull, trained, settings)
    if count == 0:
        raise UserError(f"data: nothing to score in a split of shape {tuple(data.shape)}")
    return total.item() / count, count


@torch.no_grad()
def _update(
    params: list[nn.Parameter],
    rms: list[Tensor],
    pull: list[Tensor],
    trained: list[Tensor],
    settings: DynamicEvalSettings,
) -> None:
    for p, r, k, p0 in zip(params, rms, pull, trained, strict=True):
        if p.grad is not None:
            p.sub_(settings.lr * p.grad / (r + settings.eps))
        p.add_(k * (p0 - p))
