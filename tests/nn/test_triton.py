"""The Triton backend on CPU, under Triton's interpreter: equal to the reference path.

The interpreter costs ~150 us per Triton op whatever the tile, so shapes stay tiny; it
computes bfloat16 ``tl.dot`` wrongly, so only float32 and float16 run here (bfloat16 is
covered by the ahead-of-time compile tests and the GPU check script).
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

from moglstm.nn import MogrifierLSTM, backends
from moglstm.nn.backends import graphs
from moglstm.nn.backends import triton as triton_backend
from moglstm.nn.direction import Steps
from tests.nn.test_fused import VARIANTS, run

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it


# CPU tensors under the interpreter (tests/conftest.py sets it where there is no GPU);
# on a machine with a GPU and no TRITON_INTERPRET the same tests run the compiled kernels
DEVICE = "cpu" if triton_backend.interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("neither a GPU nor TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh_graphs():
    """On a GPU, no test replays a window another test captured (with other kernels
    patched in): every test starts with no CUDA graph."""
    graphs.GRAPHS.clear()
    yield
    graphs.GRAPHS.clear()


def twins(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    ref = MogrifierLSTM(implementation="reference", **kwargs).to(DEVICE, dtype)
    tri = MogrifierLSTM(implementation="triton", **kwargs).to(DEVICE, dtype)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def agree(ref, tri, T=3, B=2, hx=True, tol=2e-5, seed=0):
    """Outputs and gradients of the input, the state and every parameter agree."""
    dtype = next(ref.parameters()).dtype
    torch.manual_seed(seed)
    x = torch.randn(T, B, ref.input_size, dtype=dtype, device=DEVICE)
    n = ref.num_layers * ref.num_directions
    state = tuple(
        torch.randn(n, B, ref.hidden_size, dtype=dtype, device=DEVICE).requires_grad_()
        for _ in range(2)
    )
    if ref.batch_first:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_()
    expected, got = run(ref, x, state if hx else None), run(tri, x, state if hx else None)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rounds", range(7))
@pytest.mark.parametrize("rank", [None, 3])
def test_triton_equals_reference_rounds_and_ranks(rounds, rank):
    if rounds == 0 and rank is not None:
        pytest.skip("no rounds: no rank")
    ref, tri = twins(input_size=5, hidden_size=6, mogrify_rounds=rounds, mogrify_rank=rank)
    agree(ref, tri)


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=lambda v: "-".join(v))
def test_triton_equals_reference_variants(variant):
    ref, tri = twins(input_size=5, hidden_size=6, mogrify_rounds=2, mogrify_rank=3, **variant)
    agree(ref, tri)


@pytest.mark.slow
def test_triton_bidirectional_three_layers_state_dropout_batch_first():
    kw = {"input_size": 4, "hidden_size": 5, "num_layers": 3, "mogrify_rounds": 3}
    ref, tri = twins(bidirectional=True, dropout=0.3, state_dropout=0.4, batch_first=True, **kw)
    agree(ref, tri, T=3, B=2)


def test_triton_two_layers_without_state():
    ref, tri = twins(input_size=5, hidden_size=6, num_layers=2, mogrify_rounds=2)
    agree(ref, tri, hx=False)


@pytest.mark.slow
def test_triton_sizes_past_one_tile():
    """Hidden 37, input 40, rank 21, batch 18: past one tile in every dimension."""
    ref, tri = twins(input_size=40, hidden_size=37, mogrify_rounds=2, mogrify_rank=21)
    agree(ref, tri, T=2, B=18, tol=5e-5)


def test_triton_float16_operands():
    ref, tri = twins(torch.float32, input_size=5, hidden_size=6, mogrify_rounds=3, mogrify_rank=3)
    tri.half()
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, device=DEVICE)
    with torch.no_grad():
        want, (h, c) = ref(x)
        got, (h2, c2) = tri(x.half())
    assert got.dtype == torch.float16
    for a, b in ((want, got), (h, h2), (c, c2)):
        torch.testing.assert_close(b.float(), a, rtol=2e-2, atol=2e-2)
    # gradients too: same module in float16 through the reference
    ref.half()
    agree(ref, tri, tol=3e-2)


def test_triton_state_carried_across_windows():
    _, tri = twins(input_size=5, hidden_size=6, mogrify_rounds=3, mogrify_rank=3)
    x = torch.randn(4, 2, 5, device=DEVICE)
    with torch.no_grad():
        out, (h, c) = tri(x)
        out1, hx = tri(x[:2])
        out2, (h2, c2) = tri(x[2:], hx)
    torch.testing.assert_close(torch.cat([out1, out2]), out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c2, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"peephole": True, "mogrify_rank": None}])
def test_triton_second_derivatives_equal_the_reference(variant):
    """create_graph=True through the Triton path (its backward recomputes the window with
    the reference, backends/recompute.py): a Hessian-vector product of every input equals
    the reference path's. Triton takes no float64, so this compares in float32 instead
    of a gradgradcheck (tests/nn/test_double_backward.py has those on the other paths)."""
    kw = {"input_size": 3, "hidden_size": 4, "mogrify_rounds": 3, "mogrify_rank": 2, **variant}
    ref, tri = twins(**kw)
    torch.manual_seed(1)
    x0 = torch.randn(3, 2, 3, device=DEVICE)
    h0, c0 = torch.randn(2, 1, 2, 4, device=DEVICE)
    results = []
    for rnn in (ref, tri):
        x, h, c = (t.clone().requires_grad_() for t in (x0, h0, c0))
        inputs = [x, h, c, *rnn.parameters()]
        out, (hn, cn) = rnn(x, (h, c))
        loss = out.pow(2).sum() + (hn * cn).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        assert all(g.grad_fn is not None for g in grads)  # second-order terms kept
        torch.manual_seed(2)
        hvp = sum((g * torch.randn_like(g)).sum() for g in grads)
        results.append([*grads, *torch.autograd.grad(hvp, inputs, allow_unused=True)])
    for a, b in zip(*results, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU behaviour")
def test_triton_refuses_cpu_without_the_interpreter(monkeypatch):
    rnn = MogrifierLSTM(5, 6, mogrify_rounds=2, implementation="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rnn(torch.randn(3, 2, 5))
    monkeypatch.setattr(triton_backend, "installed", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        rnn(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="float64"):
        monkeypatch.setattr(triton_backend, "installed", lambda: True)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        rnn.double()(torch.randn(3, 2, 5, dtype=torch.double))


def test_self_check_passes_and_warns_once_on_a_mismatch(monkeypatch):
    with torch.no_grad():  # the first call may come from an inference call
        assert triton_backend.checked_problem.__wrapped__(DEVICE, torch.float32, "ieee")
    original = triton_backend.gates_cell

    def wrong(*args):
        original(*args)
        args[8].mul_(1.5)  # h of the step

    monkeypatch.setattr(triton_backend, "gates_cell", wrong)
    triton_backend.checked_problem.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed its self-check"):
            assert not triton_backend.self_check(DEVICE, torch.float32)
        assert not triton_backend.self_check(DEVICE, torch.float32)  # cached: no new warning
    finally:
        triton_backend.checked_problem.cache_clear()


def test_auto_picks_checked_triton_on_cuda_unless_its_child_check_crashed(monkeypatch):
    """On CUDA "auto" takes the checked Triton backend (each configuration checked on its
    first window: tests/nn/test_triton_check.py), unless the device's first check crashed."""
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(backends, "unavailable_reason", lambda x: None)
    monkeypatch.setattr(backends.CHECKED_TRITON, "devices", {})
    assert backends._triton_ready(cuda)
    backends.CHECKED_TRITON.devices["cuda:0"] = False  # its child crashed
    assert not backends._triton_ready(cuda)
    assert not backends._triton_ready(torch.zeros(1))  # CPU: never by "auto"
    assert backends.select("auto", Steps(torch.zeros(3, 2, 5), None), True) is not backends.TRITON
    monkeypatch.setattr(backends, "_triton_ready", lambda x: True)
    chosen = backends.select("auto", Steps(torch.zeros(3, 2, 5), None), True)
    assert chosen is backends.CHECKED_TRITON


@pytest.mark.parametrize("one_launch", [True, False], ids=["one-launch", "two-launches"])
def test_low_rank_rounds_in_one_or_two_launches(monkeypatch, one_launch):
    """Ranks up to 128 run a round's two products as one kernel; larger ones (forced here)
    as two. Rank 33 pads to the 128 tile."""
    if not one_launch:
        monkeypatch.setattr(triton_backend, "RANK_TILES", ())
    ref, tri = twins(input_size=40, hidden_size=37, mogrify_rounds=3, mogrify_rank=33)
    agree(ref, tri, T=2, B=3, tol=5e-5)


@pytest.mark.slow
def test_triton_under_torch_compile_is_the_custom_op():
    """torch.compile(fullgraph=True) keeps the Triton backend as one custom-op node."""
    ref, tri = twins(input_size=5, hidden_size=6, mogrify_rounds=2, mogrify_rank=3)
    x = torch.randn(3, 2, 5, device=DEVICE)
    compiled = torch.compile(tri, fullgraph=True, dynamic=False)
    out, (h, c) = compiled(x)
    want, (h2, c2) = ref(x)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(c, c2, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast stands in for CUDA's here")
def test_autocast_runs_the_kernels_in_half_precision(monkeypatch):
    """Under autocast a float32 module's call is cast (input, state, weights) and "auto"
    takes the Triton backend for the cast tensors where it is ready (on CUDA after its
    self-check for that dtype; forced here): the kernels run float16 operands with float32
    accumulation, and outputs and gradients equal the reference under the same autocast."""
    asked = []
    monkeypatch.setattr(backends, "_triton_ready", lambda x: asked.append(x.dtype) or True)
    monkeypatch.setattr(backends.CHECKED_TRITON, "verdicts", {})  # its check, then the window
    monkeypatch.setattr(backends.CHECKED_TRITON, "ran", collections.Counter())
    monkeypatch.setattr(backends.triton_check, "CHILD_CHECK", "0")
    ran = []
    original = triton_backend.TRITON.eager_forward

    def recorded(spec, x, *args):
        ran.append(x.dtype)
        return original(spec, x, *args)

    monkeypatch.setattr(triton_backend.TRITON, "eager_forward", recorded)
    ref, tri = twins(input_size=5, hidden_size=6, mogrify_rounds=3, mogrify_rank=3)
    tri.implementation = "auto"
    results = []
    for rnn in (ref, tri):
        x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            out, (h, c) = rnn(x)
        (out.float().square().sum() + c.float().sum()).backward()
        results.append([out, h, c, x.grad, *(p.grad for p in rnn.parameters())])
    assert asked == [torch.float16] and ran == [torch.float16] * 2  # the check's and the call's
    assert [name for name, _ in backends.CHECKED_TRITON.ran] == ["triton"]
    assert results[1][0].dtype == torch.float16
    assert results[1][3].dtype == torch.float32  # the gradients come back in float32
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="a real CUDA graph (benchmarks/gpu_check.py)")
def test_cuda_graph_replays_equal_the_reference():
    """On a GPU: the first window runs eagerly, the second is captured in a CUDA graph and
    replayed, later ones replayed; every one equals the reference, weights updated in
    place between calls."""
    before = graphs.GRAPHS.captures, graphs.GRAPHS.replays
    ref, tri = twins(input_size=40, hidden_size=37, mogrify_rounds=5, mogrify_rank=21)
    for seed in range(4):
        agree(ref, tri, T=4, B=18, tol=5e-5, seed=seed)
        with torch.no_grad():
            for p, q in zip(ref.parameters(), tri.parameters(), strict=True):
                p.mul_(0.9)
                q.mul_(0.9)
    # the forward: eager, captured, replayed twice; the backward: eager (after the eager
    # forward), eager (the forward graph's lent buffers seen first), captured, replayed
    assert graphs.GRAPHS.captures - before[0] == 2
    assert graphs.GRAPHS.replays - before[1] == 5


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's float16 (a GPU: gpu_check.py)")
def test_cell_state_drift_over_500_steps(monkeypatch):
    """A 500-step float16 window (as enwik8-paper's), forget gates near 1 so that c sums
    the whole window (|c| up to ~18): against float64 (same rounded weights and inputs),
    the final cell state drifts about half as much with c kept in float32 (as cuDNN)
    as in float16. Measured here: c_n 8.4e-4 against 1.7e-3 (the torch-ops loop in
    float16: 1.8e-3); outputs 4.3e-4 either way."""
    import copy

    torch.manual_seed(0)
    T, B, I, H = 500, 2, 4, 8
    layer = MogrifierLSTM(I, H, mogrify_rounds=0).half()
    with torch.no_grad():
        layer.direction(0, 0).bias_hh[H : 2 * H] += 4.0  # forget gates ~0.98
    x = torch.randn(T, B, I).half()
    h = c = torch.zeros(B, H).half()
    d64 = copy.deepcopy(layer).double().direction(0, 0)
    want = backends.TORCH_LOOP.run(Steps(x.double(), None), h.double(), c.double(), d64)

    def drift(cell_f32: bool) -> tuple[float, float]:
        monkeypatch.setattr(triton_backend, "CELL_F32", cell_f32)
        with torch.no_grad():
            got = triton_backend.TRITON.run(Steps(x, None), h, c, layer.direction(0, 0))
        rel = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]
        return rel[0], rel[2]

    out32, c32 = drift(True)
    out16, c16 = drift(False)
    assert want[2].abs().max() > 10  # the state sums many steps
    assert c32 < 1.2e-3 and out32 < 1e-3, (c32, out32)
    assert c32 < 0.7 * c16, (c32, c16)
