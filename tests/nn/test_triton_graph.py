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
from moglstm.nn.backends import graphs
from moglstm.nn.backends import triton as triton_backend

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


def record_launches(monkeypatch, on_launch) -> None:
    """Every kernel of triton_kernels: ``on_launch(name)`` called, nothing run."""

    class Kernels:
        def __getattr__(self, name):
            return Launch(name)

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: on_launch(self.name)

    monkeypatch.setattr(triton_backend, "_kernels", Kernels)


def meta_window(kwargs: dict, T: int) -> tuple:
    """A layer direction of ``MogrifierLSTM(5, 6, **kwargs)`` on ``meta`` tensors: its
    ``Direction``, flat weights and ``(x, h0, c0, mask)`` of ``T`` steps of batch 3."""
    d = MogrifierLSTM(5, 6, **kwargs).direction(0, 0)
    meta = {"device": "meta"}
    flat = tuple(torch.empty(p.shape, **meta) for p in d.flat())
    shapes = ((T, 3, 5), (3, 6), (3, 6), (3, 6))
    return d, flat, tuple(torch.empty(s, **meta) for s in shapes)


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
    record_launches(monkeypatch, lambda name: events.append(("launch", name, None)))
    torch.manual_seed(0)
    d, flat, (x, h0, c0, mask) = meta_window(kwargs, 4)
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


# how a GPU runs float32 products (the interpreter: exact float32, low-rank in one launch)
PRECISIONS = {
    "interpreter": {"interpreting": True, "tf32": False},
    "ieee-gpu": {"interpreting": False, "tf32": False},
    "tf32-gpu": {"interpreting": False, "tf32": True},
}


@pytest.mark.parametrize("where", list(PRECISIONS))
@pytest.mark.parametrize(
    ("kwargs", "forward", "backward", "two_launch"),
    [
        # per step: a launch per round and the gates' (which also feeds h, masked, to the
        # next step); back: the cell, d[x_m, h_m] with the last round's gate, a product
        # per round (each chained to the round below; round 1's times the state mask).
        # Low-rank rounds in IEEE float32 on a GPU take two launches each way (their
        # one-launch tiles spill registers there): 2r + 1 forward and 2r + 2 backward
        ({"mogrify_rounds": 5, "mogrify_rank": 3}, 6, 7, (11, 12)),
        ({"mogrify_rounds": 4}, 5, 6, None),
        ({"mogrify_rounds": 1, "peephole": True}, 2, 3, None),
        ({"mogrify_rounds": 0}, 1, 2, None),  # back: the cell, d h_{t-1} (times the mask)
    ],
)
def test_launches_per_step(monkeypatch, kwargs, forward, backward, two_launch, where):
    setting = PRECISIONS[where]
    monkeypatch.setattr(triton_backend, "interpreting", lambda: setting["interpreting"])
    monkeypatch.setattr(triton_backend, "tf32_allowed", lambda: setting["tf32"])
    if two_launch and where == "ieee-gpu":
        forward, backward = two_launch
    counts: dict = {}
    record_launches(monkeypatch, lambda name: counts.update({name: counts.get(name, 0) + 1}))
    T = 4
    d, flat, (x, h0, c0, mask) = meta_window(kwargs, T)
    out, h_n, _, saved = triton_backend.TRITON.forward(d.spec, x, h0, c0, mask, flat)
    assert sum(counts.values()) == T * forward, counts
    counts.clear()
    triton_backend.TRITON.backward(d.spec, x, mask, flat, saved, torch.ones_like(out), None, None)
    assert sum(counts.values()) == T * backward, counts


def test_the_low_rank_switch_takes_two_launches_per_round(monkeypatch):
    """The speed lever ``set_low_rank_launches("two")``: every low-rank round in two
    launches (u made once), 11 forward and 12 backward per step for 5 rounds; the mode
    is part of the graph key."""
    counts: dict = {}
    record_launches(monkeypatch, lambda name: counts.update({name: counts.get(name, 0) + 1}))
    d, flat, (x, h0, c0, mask) = meta_window({"mogrify_rounds": 5, "mogrify_rank": 3}, 2)
    key_one = triton_backend.window_key(x)
    previous = triton_backend.set_low_rank_launches("two")
    try:
        assert triton_backend.window_key(x) != key_one
        out, _, _, saved = triton_backend.TRITON.forward(d.spec, x, h0, c0, mask, flat)
        assert sum(counts.values()) == 2 * 11, counts
        counts.clear()
        d_out = torch.ones_like(out)
        triton_backend.TRITON.backward(d.spec, x, mask, flat, saved, d_out, None, None)
        assert sum(counts.values()) == 2 * 12, counts
        with pytest.raises(ValueError, match="'one' or 'two'"):
            triton_backend.set_low_rank_launches("three")
    finally:
        triton_backend.set_low_rank_launches(previous)


# -- CUDA-graph capture of a window (moglstm.nn.backends.graphs), on CPU with a stand-in


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)


def _poison(outputs) -> None:
    if isinstance(outputs, torch.Tensor):
        outputs.fill_(float("nan"))
    elif isinstance(outputs, (tuple, list)):
        for o in outputs:
            _poison(o)


class FakeGraph:
    """A CUDA graph's contract on CPU: capture returns outputs at fixed addresses without
    computing them (poisoned here) or touching the inputs (it runs on copies), each replay
    recomputes from the same static inputs and writes into those outputs."""

    def capture(self, fn, inputs, warmup):
        self.fn, self.inputs = fn, inputs
        self.outputs = fn([None if t is None else t.clone() for t in inputs])
        _poison(self.outputs)
        return self.outputs

    def replay(self):
        _copy_into(self.outputs, self.fn(self.inputs))


def fake_cache(monkeypatch, make_graph=FakeGraph, **kwargs) -> graphs.GraphCache:
    cache = graphs.GraphCache(make_graph, devices=("cpu",), **kwargs)
    monkeypatch.setattr(graphs, "GRAPHS", cache)
    monkeypatch.setattr(graphs, "ENABLED", True)
    return cache


def test_graph_cache_eager_then_capture_then_replay(monkeypatch):
    cache = fake_cache(monkeypatch)
    calls = []

    def fn(a):
        calls.append(a[0].data_ptr())
        return a[0] * 2 + a[1], [a[0].sum()]

    x, y = torch.arange(4.0), torch.ones(4)
    out, (s,) = cache.run("k", [x, y], fn)  # first sighting: eager, on the caller's tensors
    assert calls == [x.data_ptr()] and cache.captures == 0
    torch.testing.assert_close(out, x * 2 + 1)
    for scale in (3.0, 5.0):  # capture (then replay), replay: inputs copied in each time
        out, (s,) = cache.run("k", [x * scale, y], fn)
        torch.testing.assert_close(out, x * scale * 2 + 1)
        torch.testing.assert_close(s, (x * scale).sum())
    assert cache.captures == 1 and cache.replays == 2
    static = cache.entries["k"].inputs[0]
    assert calls[2:] == [static.data_ptr()] * 2  # the capture (on copies), two replays
    kept = out.clone()
    cache.run("k", [x, y], fn)
    torch.testing.assert_close(out, kept)  # the caller's outputs are copies: not overwritten
    cache.run("other", [x, y], fn)  # another key: eager first
    assert cache.captures == 1


def test_graph_cache_failed_capture_warns_once_and_runs_eagerly(monkeypatch):
    class Broken:
        def capture(self, fn, inputs, warmup):
            raise RuntimeError("operation not permitted when stream is capturing")

    cache = fake_cache(monkeypatch, Broken)
    fn = lambda a: a[0] + 1  # noqa: E731
    x = torch.zeros(3)
    cache.run("a", [x], fn)
    with pytest.warns(RuntimeWarning, match="capture of a Triton window failed"):
        torch.testing.assert_close(cache.run("a", [x], fn), x + 1)
    cache.run("b", [x], fn)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: not again, for any key
        for key in ("a", "b", "a"):
            torch.testing.assert_close(cache.run(key, [x], fn), x + 1)
    assert cache.entries == {"a": None, "b": None} and cache.replays == 0


def test_graph_cache_keeps_the_most_recent_keys_and_can_be_turned_off(monkeypatch):
    cache = fake_cache(monkeypatch, max_entries=2)
    fn = lambda a: a[0] + 1  # noqa: E731
    x = torch.zeros(3)
    for key in ("a", "a", "b", "b", "a", "c", "c"):  # a, b captured; a used; c evicts b
        cache.run(key, [x], fn)
    assert list(cache.entries) == ["a", "c"]
    assert cache.applies(x) and not cache.applies(x.to("meta"))
    assert graphs.set_enabled(False) is True
    assert not cache.applies(x) and not cache.entries and not cache.seen
    graphs.set_enabled(True)
    assert not graphs.GraphCache().applies(x)  # by default only CUDA tensors are captured


@pytest.mark.parametrize("kwargs", [{"mogrify_rounds": 3, "mogrify_rank": 3}, {}])
def test_triton_windows_replayed_from_graphs_equal_the_reference(monkeypatch, kwargs):
    """Under the interpreter, with the stand-in graph: eager, captured and replayed windows
    (forward and backward) equal the reference, with the weights changed in place (an
    optimiser step) and given new storage (load_state_dict into a copy) between calls."""
    pytest.importorskip("numpy")
    from tests.nn.test_triton import DEVICE, agree, twins

    if DEVICE != "cpu":
        pytest.skip("the stand-in graph runs on CPU")
    cache = fake_cache(monkeypatch)
    ref, tri = twins(input_size=5, hidden_size=6, **kwargs)
    for call in range(4):
        if call == 2:
            with torch.no_grad():
                for p, q in zip(ref.parameters(), tri.parameters(), strict=True):
                    p.mul_(0.5)
                    q.mul_(0.5)
        if call == 3:
            state = tri.state_dict()
            tri = MogrifierLSTM(5, 6, implementation="triton", **kwargs)
            tri.load_state_dict(state)
        agree(ref, tri, seed=call)
    # the forward: eager, captured (its buffers lent to the backward), replayed twice; the
    # backward: eager (after an eager forward), eager (the lent buffers' first), captured,
    # replayed
    assert cache.captures == 2
    assert cache.replays == 5
    # the backward graph reads the forward graph's copies of x and the weights in place
    (forward,) = [e for k, e in cache.entries.items() if k[0][0] == "forward"]
    (backward,) = [e for k, e in cache.entries.items() if k[0] == "backward"]
    n = len(tri.direction(0, 0).flat())
    assert backward.inputs[0] is forward.inputs[0]
    assert all(b is f for b, f in zip(backward.inputs[2 : 2 + n], forward.inputs[4:], strict=True))
    assert {0, *range(2, 2 + n)} <= set(backward.fixed)


def test_self_check_compares_replayed_graphs(monkeypatch):
    """The self-check runs eager, captured and replayed windows; a wrong replay fails it."""
    pytest.importorskip("numpy")
    from tests.nn.test_triton import DEVICE

    class WrongReplay(FakeGraph):
        def replay(self):
            super().replay()
            _poison(self.outputs[0])

    cache = fake_cache(monkeypatch)
    assert triton_backend.checked_problem.__wrapped__(DEVICE, torch.float32, "ieee")
    assert cache.replays == 3  # the forward's capture and replay, the backward's capture
    fake_cache(monkeypatch, WrongReplay)
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        assert not triton_backend.checked_problem.__wrapped__(DEVICE, torch.float32, "ieee")


def test_graph_cache_stops_capturing_new_shapes_after_its_limit(monkeypatch):
    cache = fake_cache(monkeypatch, max_entries=2, max_captures=3)
    fn = lambda a: a[0] + 1  # noqa: E731
    x = torch.zeros(3)
    for key in ("a", "a", "b", "b", "c", "c"):
        cache.run(key, [x], fn)
    cache.run("d", [x], fn)
    with pytest.warns(RuntimeWarning, match="more than 3 window shapes"):
        torch.testing.assert_close(cache.run("d", [x], fn), x + 1)
    assert cache.captures == 3 and "d" not in cache.entries
    cache.run("c", [x], fn)  # a captured key still replays
    assert cache.replays == 4


def test_whole_windows_are_capture_safe(monkeypatch):
    """What a CUDA graph captures is the whole forward and backward (buffers, the weight
    gradients after the loop): nowhere a host read or a copy from the host, which a
    capture refuses (allocations are fine there: they come from the graph's pool)."""
    events: list = []

    class Kernels:
        def __getattr__(self, name):
            return type("Launch", (), {"__getitem__": lambda self, g: lambda *a, **k: None})()

    monkeypatch.setattr(triton_backend, "_kernels", Kernels)
    rnn = MogrifierLSTM(5, 6, mogrify_rounds=5, mogrify_rank=3, peephole=True)
    d = rnn.direction(0, 0)
    meta = {"device": "meta"}
    flat = tuple(torch.empty(p.shape, **meta) for p in d.flat())
    x, h0, c0, mask = (torch.empty(s, **meta) for s in ((4, 3, 5), (3, 6), (3, 6), (3, 6)))
    with Recorder(events):
        out, h_n, c_n, saved = triton_backend.TRITON.eager_forward(d.spec, x, h0, c0, mask, flat)
        triton_backend.TRITON.eager_backward(
            d.spec, x, mask, flat, saved, torch.ones_like(out), torch.ones_like(h_n), None
        )
    ops = [e[1] for e in events]
    assert len(ops) > 20
    bad = [op for op in ops if op.split(".")[0].startswith(SYNCING + ("lift_fresh", "_to_copy"))]
    assert not bad, f"host reads or copies in a captured window: {bad}"


def test_graph_cache_lends_buffers_and_takes_another_slot_while_they_are_held(monkeypatch):
    cache = fake_cache(monkeypatch, max_slots=2)
    fn = lambda a: [a[0] + 1, a[0] * 2]  # noqa: E731
    x = torch.ones(3)
    cache.run("k", [x], fn, lend=(1,))  # eager
    _, lent = cache.run("k", [x], fn, lend=(1,))  # slot 0 captured, its buffer lent
    assert cache.lender(lent)[1] is cache.entries[("k", 0)].outputs[1]
    _, first = cache.run("k", [x * 3], fn, lend=(1,))  # slot 0 held: slot 1, eager
    _, second = cache.run("k", [x * 5], fn, lend=(1,))  # slot 1 captured
    _, third = cache.run("k", [x * 7], fn, lend=(1,))  # both held: eager
    assert cache.captures == 2 and cache.lender(first) is None and cache.lender(third) is None
    for got, want in ((lent, 2), (first, 6), (second, 10), (third, 14)):
        torch.testing.assert_close(got, x * want)  # nothing overwritten while held
    del lent
    _, again = cache.run("k", [x * 9], fn, lend=(1,))  # slot 0 free again: replayed
    assert cache.lender(again)[1] is cache.entries[("k", 0)].outputs[1]
    torch.testing.assert_close(again, x * 18)
    torch.testing.assert_close(second, x * 10)


def test_windows_held_together_keep_their_buffers(monkeypatch):
    """Two layers of equal shapes (one key) and two windows before one backward: four
    windows' buffers held at once, each in its own slot, gradients equal the reference."""
    pytest.importorskip("numpy")
    from tests.nn.test_triton import DEVICE, twins

    if DEVICE != "cpu":
        pytest.skip("the stand-in graph runs on CPU")
    cache = fake_cache(monkeypatch)
    ref, tri = twins(input_size=6, hidden_size=6, num_layers=2, mogrify_rounds=1)
    for call in range(3):
        results = []
        for rnn in (ref, tri):
            rnn.zero_grad()
            torch.manual_seed(call)
            outs = [rnn(torch.randn(2, 2, 6))[0] for _ in range(2)]
            sum((o * o).sum() for o in outs).backward()
            results.append([*outs, *(p.grad for p in rnn.parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
    # each key's first sighting runs eagerly: forward slots 0-2 captured (slot 3 seen once),
    # a backward graph for each (after an eager forward the backward is eager)
    assert cache.captures == 6
    slots = sorted(k[1] for k, e in cache.entries.items() if k[0][0] == "forward" and e)
    assert slots == [0, 1, 2]


def test_cuda_graph_warms_up_on_a_side_stream_then_captures(monkeypatch):
    """CudaGraph's calls into torch.cuda, recorded (a CPU build cannot make them): the
    warm-up runs on a side stream that waits for the current one, on copies of the fixed
    inputs; then the capture, on that side stream (torch's default capture stream belongs
    to the device first used) in thread-local error mode (other threads' CUDA calls are
    not refused), records fn on the static inputs; a replay replays, and a replay on another
    stream than the last one first waits for it."""
    import contextlib

    log = []

    class Stream:
        device_index = 0

        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        yield
        log.append(f"off {stream.name}")

    @contextlib.contextmanager
    def capturing(graph, stream=None, capture_error_mode="global"):
        log.append(f"capture on {stream.name} ({capture_error_mode})")
        yield
        log.append("captured")

    streams = {"current": Stream("current"), "other": Stream("other")}
    current = ["current"]
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: streams[current[0]])
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    monkeypatch.setattr(graphs.CudaGraph, "last_stream", {})
    cache = fake_cache(monkeypatch, graphs.CudaGraph)
    mine = torch.ones(2)

    def fn(a):
        log.append(("fn", a[0] is mine, a[1].data_ptr() == mine.data_ptr()))
        return a[0] + a[1]

    x = torch.zeros(2)
    cache.run("k", [x, mine], fn, fixed=(1,))
    log.clear()
    cache.run("k", [x, mine], fn, fixed=(1,))
    cache.run("k", [x, mine], fn, fixed=(1,))
    current[0] = "other"
    cache.run("k", [x, mine], fn, fixed=(1,))
    assert log == [
        "side waits for current",
        "on side",
        ("fn", False, False),  # the warm-up: static x, a copy of the fixed input
        "off side",
        "current waits for side",
        "capture on side (thread_local)",
        ("fn", False, True),  # the capture: static x, the fixed input itself
        "captured",
        "replay",
        "replay",  # the same stream: no wait
        "other waits for current",
        "replay",
    ]


def test_graph_cache_serialises_threads(monkeypatch):
    """A second thread's call of the same key, arriving between the first's filling of
    the static inputs and its replay, waits: it would overwrite the first's inputs."""
    import threading

    results = {}

    class Interrupted(FakeGraph):
        def replay(self):
            if not results:  # the first replay: another thread calls in meanwhile
                other = threading.Thread(target=lambda: results.update(b=run(5.0)))
                other.start()
                other.join(timeout=0.5)  # blocked by the lock (without it: done by now)
                results["a_waited"] = other.is_alive()
                results["other"] = other
            super().replay()

    cache = fake_cache(monkeypatch, Interrupted)
    run = lambda scale: cache.run("k", [torch.ones(3) * scale], lambda a: a[0] * 2)  # noqa: E731
    run(0.0)  # eager
    run(0.0)  # captured, replayed
    results.clear()
    torch.testing.assert_close(run(3.0), torch.full((3,), 6.0))
    results["other"].join()
    assert results["a_waited"]
    torch.testing.assert_close(results["b"], torch.full((3,), 10.0))


def test_graph_keys_name_every_input_shape_and_dtype():
    a = torch.zeros(2, 3)
    sig = graphs.signature([a, None])
    assert sig == graphs.signature([torch.ones(2, 3), None])
    assert sig != graphs.signature([a.double(), None])
    assert sig != graphs.signature([torch.zeros(1, 3), None])
    assert sig != graphs.signature([a, a])


def test_window_captured_under_inference_mode_then_trained(monkeypatch):
    """A shape first captured during evaluation under inference_mode (its static buffers
    would be inference tensors, which a training call cannot fill) then trains."""
    pytest.importorskip("numpy")
    from tests.nn.test_triton import DEVICE, twins

    if DEVICE != "cpu":
        pytest.skip("the stand-in graph runs on CPU")
    cache = fake_cache(monkeypatch)
    ref, tri = twins(input_size=4, hidden_size=4, mogrify_rounds=2)
    x = torch.randn(2, 2, 4)
    with torch.inference_mode():
        for _ in range(3):
            tri(x)
    assert cache.captures == 1
    for _ in range(2):
        results = []
        for rnn in (ref, tri):
            rnn.zero_grad()
            out = rnn(x)[0]
            (out * out).sum().backward()
            results.append([out, *(p.grad for p in rnn.parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
    assert cache.replays >= 4


def test_replayed_windows_under_checkpointing_and_a_retained_graph(monkeypatch):
    """Activation checkpointing (the forward rerun in backward takes a slot again) and a
    graph kept with retain_graph while another window runs, then backward again (the
    second backward recomputes): outputs and gradients equal the reference's."""
    pytest.importorskip("numpy")
    from torch.utils.checkpoint import checkpoint

    from tests.nn.test_triton import DEVICE, twins

    if DEVICE != "cpu":
        pytest.skip("the stand-in graph runs on CPU")
    cache = fake_cache(monkeypatch)
    ref, tri = twins(input_size=4, hidden_size=4, mogrify_rounds=1)

    def step(rnn):
        torch.manual_seed(1)
        x = torch.randn(2, 2, 4, requires_grad=True)
        kept = checkpoint(lambda x: rnn(x)[0], x, use_reentrant=False)
        retained = rnn(torch.randn(2, 2, 4))[0]
        loss = (retained * retained).sum()
        loss.backward(retain_graph=True)
        other = rnn(torch.randn(2, 2, 4))[0]  # while the retained graph holds its buffers
        loss.backward()
        (kept.sum() + other.sum()).backward()
        return [kept, retained, other, x.grad]

    for _ in range(3):
        results = []
        for rnn in (ref, tri):
            rnn.zero_grad()
            results.append([*step(rnn), *(p.grad for p in rnn.parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
    assert cache.replays >= 6


def test_tf32_read_from_either_torch_api():
    """Once the new ``fp32_precision`` API is used, reading the legacy ``allow_tf32``
    raises; the products' precision (and the graphs' keys) read the new one."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only allow_tf32")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert triton_backend.tf32_allowed()
        triton_backend.window_key(torch.zeros(1))  # does not raise
        matmul.fp32_precision = "ieee"
        assert not triton_backend.tf32_allowed()
    finally:
        matmul.fp32_precision = before


def test_second_derivatives_of_replayed_windows(monkeypatch):
    """create_graph=True recomputes with the reference (the graphs take no part); then a
    plain backward of the same window still finds its lent buffers intact."""
    pytest.importorskip("numpy")
    from tests.nn.test_triton import DEVICE, twins

    if DEVICE != "cpu":
        pytest.skip("the stand-in graph runs on CPU")
    cache = fake_cache(monkeypatch)
    ref, tri = twins(input_size=4, hidden_size=4, mogrify_rounds=1)
    for seed in range(3):
        results = []
        for rnn in (ref, tri):
            rnn.zero_grad()
            torch.manual_seed(seed)
            x = torch.randn(2, 2, 4, requires_grad=True)
            out = rnn(x)[0]
            (g,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
            ((g * g).sum() + out.sum()).backward()
            results.append([out, g, *(p.grad for p in rnn.parameters())])
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
    assert cache.replays >= 2
