"""No two programs of one Triton launch touch the same byte where one of them writes it.

Triton's interpreter runs the programs of a launch one after another, so a kernel whose
programs race (one reads what another writes, or both write) still computes the right
answer here and could fail on a GPU, where they run at once. This test records, under the
interpreter, every byte each program loads and stores (by wrapping the interpreter's
masked load and store and its launch loop), and fails on any byte written by one program
and read or written by another of the same launch, across whole forward and backward
windows of every step-loop shape: rounds 0 to 5, full and low rank (one and two launches),
state mask on and off, sizes spanning several tiles with partial ones.

The wrapped functions are the interpreter's internals (present in Triton 3.6 and 3.9);
where they are missing the test skips.
"""

from __future__ import annotations

import os

import pytest
import torch

from moglstm.nn import MogrifierLSTM

pytest.importorskip("numpy")
triton = pytest.importorskip("triton")
if not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import numpy as np  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

from moglstm.nn.backends import triton as tb  # noqa: E402

NEEDED = ("create_masked_load", "create_masked_store")
if not all(hasattr(type(interp.interpreter_builder), n) for n in NEEDED) or not hasattr(
    interp, "_get_np_dtype"
):
    pytest.skip("this Triton's interpreter lacks the hooks", allow_module_level=True)


class Accesses:
    """Per launch: every (program, read or write, byte addresses) the interpreter saw."""

    def __init__(self) -> None:
        self.on, self.seen, self.conflicts = False, [], []

    def note(self, builder, kind: str, ptrs, mask) -> None:
        if not self.on:
            return
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            addr = addr[np.broadcast_to(mask.data.astype(bool), addr.shape)]
        addr = addr.ravel()
        spans = (addr[:, None] + np.arange(size, dtype=np.uint64)[None, :]).ravel()
        self.seen.append((tuple(builder.grid_idx), kind, spans))

    def check(self, name: str) -> None:
        """Bytes written by one program and read or written by another of this launch."""
        writes = [(p, b) for p, k, b in self.seen if k == "w"]
        if not writes:
            return
        owner: dict[int, tuple] = {}
        for program, spans in writes:
            for byte in np.unique(spans).tolist():
                if owner.setdefault(byte, program) != program:
                    self.conflicts.append((name, "write/write", byte))
                    return
        for program, kind, spans in self.seen:
            if kind != "r":
                continue
            for byte in np.unique(spans).tolist():
                if owner.get(byte, program) != program:
                    self.conflicts.append((name, "read/write", byte))
                    return


@pytest.fixture
def accesses(monkeypatch):
    acc = Accesses()
    builder = type(interp.interpreter_builder)
    load, store = builder.create_masked_load, builder.create_masked_store

    def masked_load(self, ptrs, mask, *rest):
        acc.note(self, "r", ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        acc.note(self, "w", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    launch = interp.GridExecutor.__call__

    def run(self, *args, **kwargs):
        acc.on, acc.seen = True, []
        try:
            return launch(self, *args, **kwargs)
        finally:
            acc.on = False
            acc.check(self.fn.__name__)

    monkeypatch.setattr(builder, "create_masked_load", masked_load)
    monkeypatch.setattr(builder, "create_masked_store", masked_store)
    monkeypatch.setattr(interp.GridExecutor, "__call__", run)
    return acc


def test_the_detector_sees_a_race(accesses):
    a, w = torch.randn(20, 70), torch.randn(70, 70)
    tb.linear(a, w, torch.empty(20, 70))
    assert not accesses.conflicts
    tb.linear(a, w, a)  # output over its own input: programs read what others write
    assert accesses.conflicts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mogrify_rounds": 0, "mask": True},
        {"mogrify_rounds": 1, "mask": True, "peephole": True},
        {"mogrify_rounds": 2, "mask": False, "input_size": 40},
        {"mogrify_rounds": 5, "mask": True},
        {"mogrify_rounds": 5, "mogrify_rank": 7, "mask": True, "coupled": True},
        {"mogrify_rounds": 4, "mogrify_rank": 7, "mask": True, "two_launches": True},
        {"mogrify_rounds": 3, "mogrify_rank": 33, "mask": True, "cap_input_gate": True},
    ],
)
def test_no_program_touches_what_another_of_its_launch_writes(accesses, monkeypatch, kwargs):
    kwargs = dict(kwargs)
    use_mask, two = kwargs.pop("mask"), kwargs.pop("two_launches", False)
    if two:  # the low-rank rounds' two-launch path (ranks over 128, IEEE float32 on a GPU)
        monkeypatch.setattr(tb, "rank_tile", lambda rank, dtype: None)
    I, H, B, T = kwargs.pop("input_size", 70), 70, 20, 2  # 2 batch tiles, 2-5 column tiles
    torch.manual_seed(0)
    d = MogrifierLSTM(I, H, **kwargs).direction(0, 0)
    flat = tuple(p.detach() for p in d.flat())
    x, h0, c0 = torch.randn(T, B, I), torch.randn(B, H), torch.randn(B, H)
    mask = (torch.rand(B, H) > 0.3).float() / 0.7 if use_mask else None
    out, _, _, saved = tb.TRITON.forward(d.spec, x, h0, c0, mask, flat)
    tb.TRITON.backward(d.spec, x, mask, flat, saved, torch.randn(T, B, H), torch.randn(B, H), None)
    assert not accesses.conflicts, accesses.conflicts
