"""Layers of the language models beyond torch.nn's: locked dropout, mixture of softmaxes.

* :class:`LockedDropout`: dropout with one mask per window (variational) or a fresh
  mask per step; :data:`DROPOUT_MASKS` are its choices (``model.dropout_mask``).
* :class:`MixtureOfSoftmaxes` (Yang et al., 2018), the output layer the paper uses on
  WikiText-2.

Mixture of softmaxes: a single softmax over ``h W^T`` gives log-probabilities of rank
at most ``E + 1`` (the "softmax bottleneck"). A mixture of ``K`` softmaxes, each over
its own projection of the hidden state, does not have that limit::

    pi      = softmax(h A^T)                       # (T, B, K)   mixture weights
    z_k     = tanh(h P_k^T + c_k)                  # (T, B, K, E) component vectors
    p(w)    = sum_k pi_k softmax(z_k W^T + b)_w    # W (V, E) may be the tied embedding

:class:`MixtureOfSoftmaxes` returns **log-probabilities** ``log p``, not logits. The
language models hand them back where other models hand back logits, which keeps
every caller right: ``log_softmax(log p) = log p - log sum(p) = log p`` because the
probabilities sum to one, so ``F.cross_entropy``, ``softmax(x / T)`` sampling and
logit temperatures all work on them unchanged.

Like :mod:`moglstm.nn`, this module imports torch only (and the plain argument checks)
and does no I/O.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moglstm.lm.arguments import check_probability

__all__ = ["DROPOUT_MASKS", "LockedDropout", "MixtureOfSoftmaxes"]

DROPOUT_MASKS = ("window", "step")


def _check_mask(mask: Any) -> str:
    if mask not in DROPOUT_MASKS:
        raise ValueError(f"mask must be one of {DROPOUT_MASKS}, got {mask!r}")
    return mask


class LockedDropout(nn.Module):
    r"""Dropout on time-major sequences, with one mask per window or one per step.

    With ``mask="window"`` (variational, "locked" dropout) a mask of shape
    ``(1, B, *)`` is drawn once per forward call, scaled by :math:`1 / (1 - p)`, and
    applied at every time step. With ``mask="step"`` every position gets its own
    mask (ordinary dropout). Identity in eval mode or when ``p == 0``.

    Args:
        p: probability of zeroing a unit, in ``[0, 1)``.
        mask: ``"window"`` or ``"step"``.

    Shape:
        - x: ``(T, B, *)``; output: the same.
    """

    def __init__(self, p: float = 0.0, mask: str = "window") -> None:
        super().__init__()
        self.p = check_probability("p", p)
        self.mask = _check_mask(mask)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        # (1, B, *) broadcast over the T axis, or (T, B, *) for a fresh mask per step
        shape = (1, *x.shape[1:]) if self.mask == "window" else x.shape
        keep = x.new_empty(shape).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", mask='step'" if self.mask == "step" else "")



class MixtureOfSoftmaxes(nn.Module):
    r"""Mixture of ``K`` softmaxes sharing one decoder; returns log-probabilities.

    The decoder (``E -> V``, possibly tied to the embedding) is not part of this
    module: the language model owns it and passes it to :meth:`forward`.

    Args:
        input_size: features of the hidden state ``h`` (``H``).
        embedding_size: size ``E`` of each component vector (the decoder's input).
        components: number of mixture components ``K >= 2``.
        dropout: dropout on the component vectors ``z_k``.
        dropout_mask: ``"window"`` (one mask per forward call, shared over time) or
            ``"step"`` (a fresh mask at every position).

    Shape:
        - h: ``(T, B, H)``; decoder: an ``nn.Linear(E, V)``.
        - output: ``(T, B, V)`` log-probabilities (``logsumexp`` over ``V`` is 0).

    Example::

        >>> decoder = nn.Linear(16, 100)
        >>> mos = MixtureOfSoftmaxes(32, 16, components=3)
        >>> logp = mos(torch.randn(5, 2, 32), decoder)
        >>> torch.allclose(logp.logsumexp(-1), torch.zeros(5, 2), atol=1e-5)
        True
    """

    returns_log_probs = True

    def __init__(
        self,
        input_size: int,
        embedding_size: int,
        components: int,
        dropout: float = 0.0,
        dropout_mask: str = "window",
    ) -> None:
        super().__init__()
        for name, size in (("input_size", input_size), ("embedding_size", embedding_size)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 2:
            raise ValueError(f"components must be an int >= 2, got {components!r}")
        self.components = components
        self.embedding_size = embedding_size
        self.prior = nn.Linear(input_size, components, bias=False)
        self.latent = nn.Linear(input_size, components * self.embedding_size)
        self.drop = LockedDropout(dropout, mask=dropout_mask)

    def forward(self, h: Tensor, decoder: nn.Linear, temperature: float = 1.0) -> Tensor:
        """Log-probabilities ``(T, B, V)`` of the mixture at every position.

        ``temperature`` divides every component's logits before its softmax (the
        mixture weights are left alone), as the official code applies its softmax
        temperature to a mixture.
        """
        if h.dim() != 3:
            raise ValueError(f"h must be (T, B, H), got shape {tuple(h.shape)}")
        if not isinstance(decoder, nn.Linear) or decoder.in_features != self.embedding_size:
            raise ValueError(
                f"decoder must be an nn.Linear with in_features={self.embedding_size}, "
                f"got {decoder!r}"
            )
        t, b, _ = h.shape
        z = torch.tanh(self.latent(h))  # (T, B, K*E)
        z = self.drop(z).view(t, b, self.components, self.embedding_size)
        # float32 for the normalisations even under autocast: sums of many small terms
        log_pi = F.log_softmax(self.prior(h).float(), dim=-1)  # (T, B, K)
        logits = decoder(z).float()  # (T, B, K, V)
        if temperature != 1.0:
            logits = logits / temperature
        log_p = F.log_softmax(logits, dim=-1)
        return torch.logsumexp(log_p + log_pi.unsqueeze(-1), dim=2)  # (T, B, V)

    def extra_repr(self) -> str:
        return f"components={self.components}"
