"""The Triton backend's step loop is safe to capture in a CUDA graph, checked on CPU.

The loop runs on ``meta`` tensors (shapes without memory; a CPU build of torch cannot
take views of FakeTensorMode's ``cuda`` tensors), its Python launchers included, with the
kernel launches recorded instead of run; every aten op is recorded too. Between the
first and the last launch of a window there must be no allocation, no copy to the host
or read of a value (which raise on meta tensors anyway), and no op whose output shape
depends on data.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moglstm.nn import MogrifierLSTM
from moglstm.nn.backends import triton as triton_backend

LAUNCHERS = (
    "linear",
    "two_products",
    "round_forward",
    "round_backward",
    "gates_cell",
    "cell_backward",
)
ALLOCATING = ("empty", "zeros", "ones", "full", "clone", "new_", "_to_copy", "rand", "cat")
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")


class Recorder(TorchDispatchMode):
    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.events.append(("op", func.__name__, out))
        return out


def in_loop(events: list) -> list[str]:
    """The aten ops between the first and the last kernel launch."""
    launches = [i for i, e in enumerate(events) if e[0] == "launch"]
    return [e[1] for e in events[launches[0] : launches[-1]] if e[0] == "op"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mogrify_rounds": 5, "mogrify_rank": 3, "peephole": True},
        {"mogrify_rounds": 4},
        {"mogrify_rounds": 0, "coupled": True},
    ],
)
def test_step_loop_is_graph_safe(monkeypatch, kwargs):
    events: list = []

    class Kernels:  # every kernel of triton_kernels: its launch recorded, not run
        def __getattr__(self, name):
            return Launch(name)

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", self.name, None))

    monkeypatch.setattr(triton_backend, "_kernels", Kernels)
    torch.manual_seed(0)
    rnn = MogrifierLSTM(5, 6, **kwargs)
    d = rnn.direction(0, 0)
    meta = {"device": "meta"}
    flat = tuple(torch.empty(p.shape, **meta) for p in d.flat())
    x, h0, c0, mask = (torch.empty(s, **meta) for s in ((4, 3, 5), (3, 6), (3, 6), (3, 6)))
    with Recorder(events):
        out, h_n, c_n, saved = triton_backend.TRITON.forward(d.spec, x, h0, c0, mask, flat)
    forward = in_loop(events)
    assert sum(e[0] == "launch" for e in events) >= 4  # four steps
    events.clear()
    with Recorder(events):
        grads = triton_backend.TRITON.backward(
            d.spec, x, mask, flat, saved, torch.ones_like(out), torch.ones_like(h_n), None
        )
    backward = in_loop(events)
    assert grads[0].shape == x.shape
    for ops in (forward, backward):
        assert ops, "no aten op recorded inside the loop: the check would prove nothing"
        bad = [op for op in ops if op.split(".")[0].startswith(ALLOCATING + SYNCING)]
        assert not bad, f"allocations or host syncs inside the step loop: {bad}"
