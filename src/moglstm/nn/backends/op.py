"""The fused backends as ``torch.library`` custom ops, for torch.compile, torch.export and
torch.func.

``moglstm::fused_direction`` runs a fused backend's ``forward`` entry point and
``moglstm::fused_direction_backward`` its ``backward`` (the contract of
:mod:`moglstm.nn.backends.base`). Each has a fake kernel that gives the output shapes
from the input shapes alone, so a tracer (Dynamo, ``torch.export``) keeps the op as one
node of its graph instead of reading its Python (ctypes, file checks): no graph break,
and the window length ``T`` and the batch stay symbolic (compiled with ``dynamic=True``,
one graph serves every window length; docs/interop.md gives the counts). The autograd
formula (``register_autograd`` with a ``setup_context``) calls the backward op, or, when
a backward runs with grad mode on (``create_graph=True``), recomputes with the reference
(:mod:`moglstm.nn.backends.recompute`) so that second derivatives are exact.

Outside a tracer the fused backends run as their own autograd node
(:class:`~moglstm.nn.backends.base.FusedDirection`), so the ops serve Dynamo and
``torch.export`` only; under ``torch.func`` transforms the module runs the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moglstm.nn.backends.base import Backend, FusedBackend, fresh
from moglstm.nn.backends.recompute import differentiable_backward
from moglstm.nn.direction import Direction, DirectionSpec, Steps


def _backend(name: str, x: Tensor) -> FusedBackend:
    """The fused backend named ``name``; ``"auto"``: the fastest step loop for ``x``, picked
    when the op runs (and by the fake kernel), never while a tracer reads Python."""
    from moglstm.nn import backends  # the package imports this module

    if name == "auto":
        return backends.step_loop(x)
    for backend in backends.STEP_LOOPS:
        if backend.name == name:
            return backend
    names = ["auto", *(b.name for b in backends.STEP_LOOPS)]
    raise ValueError(f"no fused backend named {name!r}; known: {names}")


@torch.library.custom_op("moglstm::fused_direction", mutates_args=())
def fused_direction(
    backend: str,
    spec: list[int],
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``x (T, B, I)``, ``h0, c0 (B, H)`` -> ``(out (T, B, H), h_n, c_n, saved)``."""
    out, h_n, c_n, saved = _backend(backend, x).forward(
        DirectionSpec.decode(spec), x, h0, c0, mask, tuple(flat)
    )
    inputs = [x, h0, c0, mask, *flat]
    return out, h_n, c_n, [fresh(t, inputs) for t in saved]


@fused_direction.register_fake
def _(
    backend: str,
    spec: list[int],
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    s = DirectionSpec.decode(spec)
    T, B, _ = x.shape
    saved = [x.new_empty(shape) for shape in _backend(backend, x).saved_shapes(s, x)]
    H = s.hidden_size
    return x.new_empty(T, B, H), h0.new_empty(B, H), c0.new_empty(B, H), saved


@torch.library.custom_op("moglstm::fused_direction_backward", mutates_args=())
def fused_direction_backward(
    backend: str,
    spec: list[int],
    x: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
    arena: Tensor,
    kept: list[Tensor],
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The gradients ``(dx, dh0, dc0, grads of flat)`` from the forward's saved tensors,
    ``(arena, *kept)``. The backends overwrite the buffers in ``arena``; a functional op
    may not (a compiled graph can run its backward twice with ``retain_graph=True``), and
    torch cannot functionalize a custom op that mutates an input and returns a list, so
    this works on a copy of the arena."""
    saved = (arena.clone(), *kept)
    dx, dh, dc, grads = _backend(backend, x).backward(
        DirectionSpec.decode(spec), x, mask, tuple(flat), saved, d_out, d_hn, d_cn
    )
    return dx, dh, dc, list(grads)


@fused_direction_backward.register_fake
def _(
    backend: str,
    spec: list[int],
    x: Tensor,
    mask: Tensor | None,
    flat: list[Tensor],
    arena: Tensor,
    kept: list[Tensor],
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    H = DirectionSpec.decode(spec).hidden_size
    B = x.shape[1]
    return (
        torch.empty_like(x),
        x.new_empty(B, H),
        x.new_empty(B, H),
        [torch.empty_like(w) for w in flat],
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    backend, spec, x, h0, c0, mask, flat = inputs
    ctx.backend, ctx.spec, ctx.n_flat = backend, spec, len(flat)
    ctx.save_for_backward(x, h0, c0, mask, *flat, *output[3])


def _backward(
    ctx: Any, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None, _d_saved: Any
) -> tuple[Any, ...]:
    x, h0, c0, mask, *rest = ctx.saved_tensors
    flat, saved = list(rest[: ctx.n_flat]), list(rest[ctx.n_flat :])
    if torch.is_grad_enabled():  # create_graph=True: recompute with the reference
        grads = differentiable_backward(
            DirectionSpec.decode(ctx.spec),
            (x, h0, c0, mask, *flat),
            (d_out, d_hn, d_cn),
            [*ctx.needs_input_grad[2:6], *(w.requires_grad for w in flat)],
        )
        return None, None, *grads[:3], None, grads[4:]
    # the backward op works on a copy of the buffers: a second backward through a retained
    # graph gives the same bits
    dx, dh, dc, grads = fused_direction_backward(
        ctx.backend, ctx.spec, x, mask, flat, saved[0], saved[1:], d_out, d_hn, d_cn
    )
    return None, None, dx, dh, dc, None, grads


fused_direction.register_autograd(_backward, setup_context=_setup_context)


class LibraryOp(Backend):
    """A fused backend through the custom op: ``backend`` by name, or ``"auto"``, the
    fastest step loop (picked when the op runs)."""

    name = "library-op"

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def run(
        self,
        steps: Steps,
        h: Tensor,
        c: Tensor,
        d: Direction,
        reverse: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if steps.batch_sizes is not None:
            raise ValueError(f"the {self.name} backend does not take packed sequences")
        return run_op(self.backend, steps.x, h, c, d, reverse, mask)


def run_op(
    backend: str,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    d: Direction,
    reverse: bool,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction over ``x (T, B, I)`` through the custom op with fused backend
    ``backend`` (a name, or ``"auto"``)."""
    x = x.flip(0) if reverse else x
    out, h_n, c_n, _ = fused_direction(
        backend,
        d.spec.encode(),
        x.contiguous(),
        h.contiguous(),
        c.contiguous(),
        mask,
        d.flat(),
    )
    return (out.flip(0) if reverse else out), h_n, c_n
