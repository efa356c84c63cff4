"""The seam: what every backend of a layer direction provides.

A :class:`Backend` runs one direction of one layer over a window:
:meth:`Backend.run` takes the layer input as :class:`~moglstm.nn.direction.Steps`, the
initial state, a :class:`~moglstm.nn.direction.Direction` and the state-dropout mask and
returns ``(output, h_n, c_n)``. The reference backend lets autograd record every op of
every step. A :class:`FusedBackend` runs the direction as one autograd node
(:class:`FusedDirection`) around two plain entry points, meant to be wrapped as they are
(by this module's autograd Function, or by a ``torch.library`` custom op):

``forward(spec, x, h0, c0, mask, flat) -> (out, h_n, c_n, saved)``
    ``x (T, B, I)`` contiguous, ``h0, c0 (B, H)``, ``mask (B, H)`` or None, ``flat`` the
    weights as :meth:`Direction.flat` lists them. ``out`` is ``(T, B, H)``, ``h_n, c_n``
    ``(B, H)`` (fresh tensors, not views of ``out``); ``saved`` is a tuple of tensors the
    backend needs in backward (its window buffers), never an input or output.

``backward(spec, x, mask, flat, saved, d_out, d_hn, d_cn) -> (dx, dh0, dc0, grads)``
    The gradients of the forward's inputs for those of its outputs (each may be None:
    zeros); ``grads`` follows ``flat``. It overwrites ``saved`` (which is spent after it)
    and never reads ``out``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moglstm.nn.backends.recompute import differentiable_backward
from moglstm.nn.direction import Direction, DirectionSpec, Steps

Saved = tuple[Tensor, ...]


class Backend:
    """One implementation of a layer direction over a window."""

    name: str = "?"

    def run(
        self, steps: Steps, h: Tensor, c: Tensor, d: Direction, reverse: bool, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(output, h_n, c_n)``: ``output`` is ``(T, B, H)`` (``(N, H)`` when packed);
        ``reverse`` runs the steps last to first; ``mask`` multiplies the ``h`` fed
        into each step (state dropout)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<moglstm backend {self.name}>"


class FusedBackend(Backend):
    """A backend that runs a direction as one autograd node; subclasses provide
    :meth:`forward` and :meth:`backward` (the contract in the module docstring)."""

    def forward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
    ) -> tuple[Tensor, Tensor, Tensor, Saved]:
        raise NotImplementedError

    def saved_shapes(self, spec: DirectionSpec, x: Tensor) -> list[tuple[int, ...]]:
        """The shapes of what :meth:`forward` saves for input ``x`` (``saved``, in order,
        dtype and device of ``x``); sizes may be symbolic (a custom op's fake kernel)."""
        raise NotImplementedError

    def backward(
        self,
        spec: DirectionSpec,
        x: Tensor,
        mask: Tensor | None,
        flat: tuple[Tensor, ...],
        saved: Saved,
        d_out: Tensor | None,
        d_hn: Tensor | None,
        d_cn: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        raise NotImplementedError

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
        x = steps.x.flip(0) if reverse else steps.x
        out, h_n, c_n, *_saved = FusedDirection.apply(
            self, d.spec, x.contiguous(), h.contiguous(), c.contiguous(), mask, *d.flat()
        )
        return (out.flip(0) if reverse else out), h_n, c_n


def fresh(t: Tensor, inputs: tuple[Tensor | None, ...] | list[Tensor | None]) -> Tensor:
    """``t``, or a copy when it shares memory with an input: an autograd Function or custom
    op may not return an input as one of its outputs (the compiled loop saves ``weight_hh``
    itself when there are no rounds)."""
    ptr = t.untyped_storage().data_ptr()
    if any(i is not None and i.untyped_storage().data_ptr() == ptr for i in inputs):
        return t.clone()
    return t


class FusedDirection(torch.autograd.Function):
    """``(backend, spec, x, h0, c0, mask, *flat) -> (out, h_n, c_n, *saved)`` as one node.

    ``saved`` (the backend's buffers, not differentiable) are outputs so that the
    forward takes no ``ctx`` (a separate ``setup_context``, as torch.func asks of a
    Function). The module does not run it under torch.func transforms or forward-mode AD
    (:func:`moglstm.nn.backends.traced_backend`); called there directly, ``vmap`` and
    forward-mode AD are refused with an error that says what to use.
    """

    @staticmethod
    def forward(
        backend: FusedBackend,
        spec: DirectionSpec,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        mask: Tensor | None,
        *flat: Tensor,
    ) -> tuple[Tensor, ...]:
        with torch.autocast(x.device.type, enabled=False):  # it runs in x's dtype
            out, h_n, c_n, saved = backend.forward(spec, x, h0, c0, mask, flat)
        inputs = (x, h0, c0, mask, *flat)
        return out, h_n, c_n, *(fresh(t, inputs) for t in saved)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        backend, spec, x, h0, c0, mask, *flat = inputs
        saved = output[3:]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # None for unused outputs: no zero-filled buffers
        ctx.backend, ctx.spec, ctx.n_flat, ctx.spent = backend, spec, len(flat), False
        ctx.save_for_backward(x, h0, c0, mask, *flat, *saved)

    @staticmethod
    def backward(
        ctx: Any, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None, *_d_saved: Any
    ) -> tuple[Tensor | None, ...]:
        x, h0, c0, mask, *rest = ctx.saved_tensors
        flat, saved = tuple(rest[: ctx.n_flat]), tuple(rest[ctx.n_flat :])
        if torch.is_grad_enabled():
            # create_graph=True (second derivatives): recompute with the reference, which
            # autograd records
            grads = differentiable_backward(
                ctx.spec, (x, h0, c0, mask, *flat), (d_out, d_hn, d_cn), ctx.needs_input_grad[2:]
            )
            return None, None, *grads[:3], None, *grads[4:]
        with torch.autocast(x.device.type, enabled=False):  # as its forward (custom_bwd)
            if ctx.spent:
                # a second backward through a retained graph: the first overwrote the
                # buffers, so the forward runs again for fresh ones, and every backward
                # gives the same bits (gradcheck's reentrancy check, nondet_tol=0)
                *_, saved = ctx.backend.forward(ctx.spec, x, h0, c0, mask, flat)
            ctx.spent = True
            # the backward overwrites the buffers: through .data, which autograd's version
            # counters do not see (a retained graph's second backward reads the saved
            # tensors again, and never these buffers)
            dx, dh, dc, grads = ctx.backend.backward(
                ctx.spec, x, mask, flat, tuple(t.data for t in saved), d_out, d_hn, d_cn
            )
        needs = ctx.needs_input_grad
        grads = [g if need else None for g, need in zip(grads, needs[6:], strict=True)]
        return None, None, dx, dh, dc, None, *grads

    @staticmethod
    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        raise NotImplementedError(_REFUSED.format("torch.func.vmap"))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise NotImplementedError(_REFUSED.format("Forward-mode AD (torch.func.jvp)"))


_REFUSED = (
    "{} over the fused Mogrifier LSTM path is not supported (its step loops take whole "
    "batches and have a reverse-mode backward only): build the module with "
    "implementation='auto' (the reference under torch.func transforms) or 'reference'"
)
