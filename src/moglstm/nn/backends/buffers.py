"""The window buffers of the step-loop backends (torch-ops loop, compiled loop).

The forward loop keeps what backward needs in preallocated ``(T, B, .)`` buffers carved
out of one allocation (the *arena*, which is what the backend saves for backward); the
backward loop runs only the chain through ``h`` and ``c`` (and the Mogrifier rounds) and
the weight gradients come after it as a few large products over ``T * B`` rows
(:func:`weight_grads`).

Buffers reuse: in backward, step ``t``'s gate activations are overwritten by the gate
gradients and each round's sigmoid output by that round's pre-activation gradient, once
they have been read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moglstm.nn import _kernels
from moglstm.nn.direction import DirectionSpec


def round_slots(rounds: int) -> list[tuple[int, int]]:
    """For each round, ``(version index of the gated vector before the round,
    version index of the gating vector)``; x versions change on odd rounds
    (index 0 of the list), h versions on even ones."""
    slots, xi, hi = [], 0, 0
    for r in range(rounds):
        if r % 2 == 0:
            slots.append((xi, hi))
            xi += 1
        else:
            slots.append((hi, xi))
            hi += 1
    return slots


def layout(spec: DirectionSpec, T: int, B: int) -> dict[str, list[tuple[int, ...]]]:
    """The shapes of the buffers carved out of the arena, by name."""
    I, H, R = spec.input_size, spec.hidden_size, spec.rounds
    nx, nh = (R + 1) // 2 + 1, R // 2 + 1
    return {
        "xh": [(T, B, I + H)] if R else [],
        "xs": [(T, B, I)] * (nx - 2) if R else [],
        "hs": [(T, B, H)] * (nh - 1 if R else 1),
        "u": [(T, B, k) for k in spec.ranks if k is not None],  # low-rank v @ right.T
        "gates": [(T, B, spec.gate_rows)],  # activated i, f, g, o
        "c": [(T + 1, B, H)],  # c[0] = c_0, c[t + 1] = c_t
    }


def widen(name: str, element_size: int, cell_f32: bool) -> int:
    """Arena elements per element of buffer ``name``: 4 / element size for the cell state
    kept in float32 (``cell_f32``) in a 16-bit arena, else 1."""
    return 4 // element_size if cell_f32 and name == "c" and element_size < 4 else 1


def arena_size(
    shapes: dict[str, list[tuple[int, ...]]], element_size: int, cell_f32: bool = False
) -> int:
    """Elements of the arena that holds ``shapes`` with each buffer 64-byte aligned (sizes
    may be symbolic: the custom op's fake kernel calls this while tracing); ``cell_f32``:
    the cell state ``c`` in float32 (:class:`Buffers`)."""
    align = 64 // element_size
    return sum(
        -(-math.prod(s) * widen(name, element_size, cell_f32) // align) * align
        for name, group in shapes.items()
        for s in group
    )


def arena_shape(spec: DirectionSpec, x: Tensor, cell_f32: bool = False) -> tuple[int]:
    """The shape of the arena for input ``x`` ``(T, B, I)``: what the step loops save."""
    T, B, _ = x.shape
    return (arena_size(layout(spec, T, B), x.element_size(), cell_f32),)


def carve(
    like: Tensor,
    shapes: dict[str, list[tuple[int, ...]]],
    arena: Tensor | None = None,
    cell_f32: bool = False,
) -> tuple[Tensor, dict[str, list[Tensor]]]:
    """Tensors of the given shapes, carved out of one allocation (64-byte aligned views):
    ``arena`` if given (as :func:`carve` returned it before), else a new one.

    A window's buffers are about 100 MB per layer at B=64, T=70, H=512; first-touching
    them in 4 KiB pages cost about 0.5 ms per MB here, so on CPU the block is advised
    to use transparent huge pages (a no-op where Linux or the machine says no).
    """
    size = like.element_size()
    align = 64 // size
    sizes = {
        name: [math.prod(s) * widen(name, size, cell_f32) for s in group]
        for name, group in shapes.items()
    }
    total = arena_size(shapes, size, cell_f32)
    if arena is None:
        arena = like.new_empty(total)
        if like.device.type == "cpu":
            _kernels.advise_huge_pages(arena)
    elif arena.numel() != total:
        raise ValueError(f"saved arena holds {arena.numel()} elements, the layout {total}")
    out, offset = {}, 0
    for name, group in shapes.items():
        out[name] = []
        for shape, n in zip(group, sizes[name], strict=True):
            part = arena[offset : offset + n]
            if widen(name, size, cell_f32) > 1:  # the cell state in float32 (same bytes)
                part = part.view(torch.float32)
            out[name].append(part.view(shape))
            offset += -(-n // align) * align
    return arena, out


class Buffers:
    """Everything the forward keeps for backward, ``T`` steps of ``B`` rows of input ``x``.

    ``xs``/``hs`` list the versions of x and h that the rounds produce, each
    ``(T, B, .)``: ``xs[0]`` is the input itself, ``hs[0]`` the (masked) h_{t-1}.
    With rounds, the last versions are the two halves of one ``(T, B, I + H)``
    buffer ``xh``, so the gates take one matrix product per step. Pass the ``arena``
    of the forward's buffers to view them again in backward. ``cell_f32``: the cell
    states ``c`` in float32 whatever ``x``'s dtype (as cuDNN keeps them; the Triton
    backend), carved out of the same arena.
    """

    def __init__(
        self, spec: DirectionSpec, x: Tensor, arena: Tensor | None = None, cell_f32: bool = False
    ) -> None:
        T, B, I = x.shape
        self.arena, parts = carve(x, layout(spec, T, B), arena, cell_f32)
        if spec.rounds:
            self.xh = parts["xh"][0]
            self.xs = [x, *parts["xs"], self.xh[..., :I]]
            self.hs = [*parts["hs"], self.xh[..., I:]]
        else:  # no rounds: x is never gated and the x projection is precomputed
            self.xh = None
            self.xs, self.hs = [x], parts["hs"]
        self.u, self.gates, self.c = parts["u"], parts["gates"][0], parts["c"][0]


def start_window(
    spec: DirectionSpec, x: Tensor, c0: Tensor, cell_f32: bool = False
) -> tuple[Buffers, Tensor]:
    """A forward's fresh buffers for input ``x`` (with ``c_0`` in place) and its output
    ``(T, B, H)`` (the caller's: not carved, never read by backward)."""
    buf = Buffers(spec, x, cell_f32=cell_f32)
    buf.c[0].copy_(c0)
    return buf, x.new_empty(*x.shape[:2], spec.hidden_size)


def fresh_grad(g: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous copy of an incoming gradient (the loops update it in place), or zeros."""
    return torch.zeros_like(like) if g is None else g.clone(memory_format=torch.contiguous_format)


def rows(v: Tensor) -> Tensor:
    """``(T, B, n)`` -> ``(T*B, n)`` (a view where the strides allow)."""
    return v.reshape(-1, v.shape[-1])


def split_gates(spec: DirectionSpec, gates: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(i, f, g, o)`` views of a ``(..., G)`` gate tensor (``i`` is None if coupled)."""
    if spec.coupled:
        f, g, o = gates.chunk(3, -1)
        return None, f, g, o
    return gates.chunk(4, -1)


def weight_grads(
    spec: DirectionSpec,
    buf: Buffers,
    round_grads: list[list[Tensor]],
    db: Tensor | None,
    *,
    split: bool = False,
) -> list[Tensor]:
    """All parameter gradients in :meth:`Direction.flat` order, given the rounds' (a list
    per round) and, if already summed, the gates' bias gradient ``db``; the gates'
    weight gradients as products over ``T * B`` rows of ``buf.gates`` (which backward
    has overwritten with the pre-activation gate gradients): one product with
    ``[x_m, h_m]`` split in two copies, or (``split``) one product per half, read in place
    (less memory: no ``(G, I + H)`` temporary, no copies)."""
    dgates = rows(buf.gates)
    grads: list[Tensor] = [g for parts in round_grads for g in parts]
    if buf.xh is None or split:
        grads += [dgates.t() @ rows(buf.xs[-1]), dgates.t() @ rows(buf.hs[-1])]
    else:
        dw_cat = dgates.t() @ rows(buf.xh)
        I = spec.input_size
        grads += [dw_cat[:, :I].contiguous(), dw_cat[:, I:].contiguous()]
    if spec.bias:
        db = dgates.sum(0) if db is None else db
        grads += [db, db.clone()]
    if spec.peephole:
        dz_i, dz_f, _, dz_o = split_gates(spec, buf.gates)
        c_prev, c = buf.c[:-1], buf.c[1:]
        kind = dgates.dtype  # the weights' (c may be float32: Buffers' cell_f32)
        if dz_i is not None:
            grads.append((dz_i * c_prev).sum((0, 1)).to(kind))
        grads += [(dz_f * c_prev).sum((0, 1)).to(kind), (dz_o * c).sum((0, 1)).to(kind)]
    return grads
