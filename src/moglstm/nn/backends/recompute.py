"""Differentiable backward of the fused path, by recomputing the window with the reference.

A fused backend's own backward (:mod:`moglstm.nn.backends.base`) is a hand-written
loop over buffers: its gradients carry no autograd graph. When a backward runs with grad mode
on (``create_graph=True``: MAML, gradient penalties, ``torch.func.grad`` of a grad,
``gradgradcheck``), that loop would silently drop every second-order term. Instead the
window is run again through :mod:`moglstm.nn.functional` on the saved inputs and
differentiated with ``create_graph=True``: the gradients are the same numbers, and
they carry the graph of the reference path, so second derivatives are exact. The same
route serves a second backward through a graph kept with ``retain_graph=True``, after
the first has freed the fused buffers.

It costs a reference forward and backward of the window (the reference path's speed
and memory), only in those cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moglstm.nn.direction import Direction, DirectionSpec, Steps


def reference_window(
    spec: DirectionSpec,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    mask: Tensor | None,
    flat: Sequence[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused node's function by the reference backend: ``x`` ``(T, B, I)``, ``h``,
    ``c``, ``mask`` ``(B, H)`` -> ``(output (T, B, H), h_n, c_n)``."""
    from moglstm.nn.backends.reference import Reference  # it imports base, which imports us

    return Reference().run(Steps(x, None), h, c, Direction.from_flat(spec, flat), False, mask)


def differentiable_backward(
    spec: DirectionSpec,
    saved: Sequence[Tensor | None],
    grads: Sequence[Tensor | None],
    needs: Sequence[bool],
) -> list[Tensor | None]:
    """Gradients of ``saved = (x, h0, c0, mask, *flat)`` for the output gradients
    ``grads = (d_out, d_hn, d_cn)``, with the reference path's autograd graph attached
    when grad mode is on. ``needs[i]``: whether ``saved[i]`` needs a gradient."""
    wanted = [i for i, n in enumerate(needs) if n and saved[i] is not None]
    create_graph = torch.is_grad_enabled() and _any_graph(saved, grads)
    with torch.enable_grad():
        # inputs that need no gradient still take part (detached: nothing flows there)
        args = [t if (i in wanted or t is None) else t.detach() for i, t in enumerate(saved)]
        outs = reference_window(spec, args[0], args[1], args[2], args[3], args[4:])
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [saved[i] for i in wanted],
            [g for _, g in pairs],
            create_graph=create_graph,
            allow_unused=True,
        )
    result: list[Tensor | None] = [None] * len(saved)
    for i, g in zip(wanted, found, strict=True):
        result[i] = torch.zeros_like(saved[i]) if g is None else g
    return result


def _any_graph(saved: Sequence[Tensor | None], grads: Sequence[Tensor | None]) -> bool:
    return any(t is not None and t.requires_grad for t in (*saved, *grads))
