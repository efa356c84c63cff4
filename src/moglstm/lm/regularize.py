"""The training side of the Mogrifier paper's recipe, as small standalone pieces.

The layers (:class:`~moglstm.lm.layers.LockedDropout`) live in :mod:`moglstm.lm.layers`.

* :func:`l2_penalty`: the L2 term added to the training loss;
* :func:`drop_state`: zero the carried state of random streams between windows;
* :class:`WeightAverager`: a running average of the weights, used for validation and
  checkpoints once averaging has been triggered;
* :func:`scaled_dropout`: temporarily scale every dropout rate of a model (for
  Monte-Carlo dropout evaluation).

The training loop (:mod:`moglstm.lm.train`) wires them to the config keys
``model.dropout_mask``, ``train.l2``, ``model.drop_state_probability``,
``train.average_after_bad_evals`` and ``train.average_from_step``; see
``docs/reproduce.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moglstm.lm.arguments import check_probability
from moglstm.lm.errors import UserError
from moglstm.lm.layers import LockedDropout
from moglstm.lm.state import map_state, state_tensors
from moglstm.nn import MogrifierLSTM

__all__ = [
    "WeightAverager",
    "drop_state",
    "l2_penalty",
    "scaled_dropout",
]

def _unique_parameters(module: nn.Module) -> list[nn.Parameter]:
    # Module.parameters() already yields a tied (shared) tensor once.
    return list(module.parameters())


def l2_penalty(model: nn.Module, coefficient: float) -> Tensor:
    r"""``coefficient * sum(p ** 2)`` over all of ``model``'s parameters (tied ones once).

    Unlike decoupled weight decay this is part of the loss, so it goes through
    gradient clipping and Adam's normalisation, as in the official Mogrifier code.

    Args:
        model: the module whose parameters are penalised (biases included).
        coefficient: the L2 coefficient, ``>= 0``.

    Returns:
        A scalar tensor (float32, on the parameters' device) with a gradient.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)):
        raise TypeError(f"coefficient must be a float, got {coefficient!r}")
    if coefficient < 0:
        raise ValueError(f"coefficient must be >= 0, got {coefficient}")
    params = [p for p in _unique_parameters(model) if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters to penalise")
    squares = torch.stack([p.float().square().sum() for p in params]).sum()
    return squares * float(coefficient)


def drop_state(state: Any, p: float, generator: torch.Generator | None = None) -> Any:
    r"""Zero the carried state of each stream independently with probability ``p``.

    One draw per stream zeroes that stream in every tensor of the state (every
    layer, ``h`` and ``c``), so it starts the next window from a zero state, as at
    the start of the data. Used once per training batch.

    Args:
        state: a model state: ``None``, a tensor, or (nested) tuples/lists of tensors
            whose dimension 1 is the batch (as :class:`~moglstm.lm.models.RNNLanguageModel`
            returns: ``(1, B, H)`` per layer).
        p: probability of zeroing a stream, in ``[0, 1)``.
        generator: random generator for the draws (default: torch's global one).

    Returns:
        The state with the same structure; ``None`` stays ``None``.
    """
    p = check_probability("p", p)
    tensors = list(state_tensors(state))
    if p == 0.0 or not tensors:
        return state
    batch = tensors[0].shape[1]
    device = tensors[0].device
    draws = torch.rand(batch, generator=generator, device="cpu" if generator else device)
    keep = (draws >= p).to(device)  # (B,) True: keep this stream's state
    return map_state(state, lambda t: t * keep.view(1, -1, *([1] * (t.dim() - 2))).to(t.dtype))


class WeightAverager:
    r"""Running (uniform) average of a model's parameters from the moment it starts.

    After :meth:`start` the average is the current weights; each :meth:`update`
    (call it after every optimizer step) folds the current weights in, so after
    ``n`` snapshots it is exactly their mean
    :math:`\bar\theta_n = \bar\theta_{n-1} + (\theta_n - \bar\theta_{n-1}) / n`.
    Training keeps updating the raw weights; :meth:`swapped_in` puts the average in
    the model for validation and saving.

    Args:
        model: the model whose parameters are averaged.

    Example::

        >>> avg = WeightAverager(model)
        >>> avg.start()                # e.g. after validations stopped improving
        >>> for step in ...:
        ...     optimizer.step(); avg.update()
        >>> with avg.swapped_in():
        ...     valid_loss = evaluate(model)
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.count = 0  # snapshots averaged so far; 0: not started
        self.average: dict[str, Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether averaging has started."""
        return self.count > 0

    def _named(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())  # tied tensors once, under one name

    @torch.no_grad()
    def start(self) -> None:
        """Begin averaging with the current weights as the first snapshot."""
        self.average = {name: p.detach().clone() for name, p in self._named().items()}
        self.count = 1

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (no-op before :meth:`start`)."""
        if not self.active:
            return
        self.count += 1
        for name, p in self._named().items():
            self.average[name].lerp_(p.detach(), 1.0 / self.count)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[nn.Module]:
        """Within the block the model holds the averaged weights (if started)."""
        if not self.active:
            yield self.model
            return
        named = self._named()
        raw = {name: p.detach().clone() for name, p in named.items()}
        try:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(self.average[name])
            yield self.model
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(raw[name])

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict()`` with the averaged weights (detached copies).

        Before :meth:`start` it is the model's own state. Tied tensors appear under
        each of their names, as in ``state_dict()``.
        """
        by_id = {id(p): self.average[n] for n, p in self._named().items() if self.active}
        state = self.model.state_dict(keep_vars=True)
        return {k: by_id.get(id(v), v).detach().clone() for k, v in state.items()}

    def restore(self, count: int, averaged: dict[str, Tensor]) -> None:
        """Resume averaging: ``count`` snapshots whose mean is in ``averaged``.

        Args:
            count: snapshots averaged so far (0: not started; ``averaged`` is ignored).
            averaged: a state dict as :meth:`averaged_state_dict` returns.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise UserError(f"count must be an int >= 0, got {count!r}")  # a checkpoint's
        named = self._named()
        if count and not set(named) <= set(averaged):
            missing = sorted(set(named) - set(averaged))
            raise UserError(f"averaged weights lack {missing[:5]}")
        self.count = count
        self.average = {}
        if count:
            with torch.no_grad():
                for name, p in named.items():
                    self.average[name] = averaged[name].to(p.device, p.dtype).clone()


_DROPOUT_ATTRIBUTES = ("embedding_dropout",)  # plain float rates on a module


@contextlib.contextmanager
def scaled_dropout(model: nn.Module, scale: float) -> Iterator[nn.Module]:
    """Multiply every dropout rate in ``model`` by ``scale`` within the block.

    Covers :class:`LockedDropout` and :class:`torch.nn.Dropout` modules, the state
    dropout of :class:`moglstm.nn.MogrifierLSTM` layers, attention dropout of
    :class:`torch.nn.MultiheadAttention`, and an ``embedding_dropout`` rate. Used by
    Monte-Carlo dropout evaluation (``moglstm evaluate --mc-samples``).

    Args:
        model: the model.
        scale: the multiplier, ``>= 0``; every scaled rate must stay below 1.

    Raises:
        ValueError: a scaled rate would reach 1.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise UserError(f"scale must be a number >= 0, got {scale!r}")
    changed: list[tuple[Any, str, float]] = []
    for module in model.modules():
        for attr in _rate_attributes(module):
            rate = getattr(module, attr)
            if rate * scale >= 1.0:
                raise UserError(
                    f"dropout scale {scale} makes a rate of {rate} reach {rate * scale:.3g} >= 1"
                )
            changed.append((module, attr, rate))
    try:
        for module, attr, rate in changed:
            setattr(module, attr, rate * scale)
        yield model
    finally:
        for module, attr, rate in changed:
            setattr(module, attr, rate)


def _rate_attributes(module: nn.Module) -> list[str]:
    if isinstance(module, (LockedDropout, nn.Dropout)):
        return ["p"]
    if isinstance(module, MogrifierLSTM):
        return ["state_dropout"]
    if isinstance(module, nn.MultiheadAttention):
        return ["dropout"]
    return [a for a in _DROPOUT_ATTRIBUTES if isinstance(getattr(module, a, None), float)]
