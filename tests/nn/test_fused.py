"""The fused path equals the reference path: outputs and gradients of everything."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from moglstm.nn import MogrifierLSTM, _kernels, backends
from moglstm.nn.direction import Steps

D = torch.double
VARIANTS = [
    {},
    {"coupled": True},
    {"peephole": True},
    {"cap_input_gate": True},
    {"coupled": True, "peephole": True, "bias": False},
    {"peephole": True, "cap_input_gate": True},
]
ROUNDS = [(0, None), (1, None), (4, None), (5, 2), (6, 3)]


@pytest.fixture(params=["compiled-loop", "kernels", "torch-ops"], autouse=True)
def pointwise(request, monkeypatch):
    """Run every test with the compiled step loop, with the Python step loop and the C
    pointwise kernels, and with the Python step loop and torch ops only."""
    if request.param == "compiled-loop" and not _kernels.loop_available(torch.zeros(1)):
        pytest.skip("no C compiler or no BLAS entry points in torch: no compiled loop here")
    if request.param == "kernels" and _kernels.load() is None:
        pytest.skip("no C compiler: the kernels cannot be built here")
    if request.param != "compiled-loop":
        monkeypatch.setattr(_kernels, "loop_available", lambda t: False)
    if request.param == "torch-ops":
        monkeypatch.setattr(_kernels, "available", lambda t: False)
    return request.param


def twins(dtype=D, **kwargs):
    torch.manual_seed(0)
    ref = MogrifierLSTM(implementation="reference", **kwargs).to(dtype)
    fused = MogrifierLSTM(implementation="fused", **kwargs).to(dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(module, x, hx, seed=0):
    """Outputs and gradients of x, hx (unless None) and every parameter for a weighted
    loss."""
    torch.manual_seed(seed)  # same state-dropout masks for both twins
    out, (h, c) = module(x, hx)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    loss = (out * weights.view_as(out)).sum() + (h * 2).sum() - c.sum()
    grads = torch.autograd.grad(loss, [x, *(hx or ()), *module.parameters()])
    return [out, h, c, *grads]


def assert_twins_agree(ref, fused, x, hx, rtol, atol):
    for a, b in zip(run(ref, x, hx), run(fused, x, hx), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)


def inputs(size, layers, dtype=D, T=7, B=3, hidden=4):
    x = torch.randn(T, B, size, dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(layers, B, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
    return x, hx


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rounds, rank", ROUNDS)
def test_fused_equals_reference_float64(variant, rounds, rank):
    ref, fused = twins(
        input_size=5,
        hidden_size=4,
        num_layers=2,
        mogrify_rounds=rounds,
        mogrify_rank=rank,
        **variant,
    )
    x, hx = inputs(5, 2)
    assert_twins_agree(ref, fused, x, hx, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize(
    "bidirectional, batch_first", list(itertools.product([False, True], repeat=2))
)
def test_fused_directions_and_layouts(bidirectional, batch_first):
    ref, fused = twins(
        input_size=5,
        hidden_size=4,
        num_layers=2,
        mogrify_rounds=5,
        mogrify_rank=2,
        bidirectional=bidirectional,
        batch_first=batch_first,
        dropout=0.3,
        state_dropout=0.4,
    )
    x, hx = inputs(5, 2 * (1 + bidirectional))
    if batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    assert_twins_agree(ref, fused, x, hx, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7])
def test_round_gradients_accumulated_over_chunks(monkeypatch, chunk_rows):
    from moglstm.nn.backends import torch_loop

    monkeypatch.setattr(torch_loop.RoundGrads, "CHUNK_ROWS", chunk_rows)  # B=3: chunks of 1, 2, 3
    ref, fused_rnn = twins(
        input_size=5, hidden_size=4, num_layers=2, mogrify_rounds=5, mogrify_rank=2, peephole=True
    )
    x, hx = inputs(5, 2, T=8)
    assert_twins_agree(ref, fused_rnn, x, hx, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("scale", [100.0, 1e4])
def test_saturated_gates_stay_finite(scale):
    """Huge pre-activations saturate every gate; nothing may turn into NaN (exp overflow)."""
    ref, fused_rnn = twins(
        torch.float32,
        input_size=6,
        hidden_size=5,
        num_layers=2,
        mogrify_rounds=5,
        peephole=True,
        cap_input_gate=True,
    )
    x, hx = inputs(6, 2, torch.float32, T=6, B=3, hidden=5)
    x = (x.detach() * scale).requires_grad_()
    for value in run(fused_rnn, x, hx):
        assert torch.isfinite(value).all()
    if scale <= 100:  # beyond, float32 gradients of saturated gates are rounding noise
        assert_twins_agree(ref, fused_rnn, x, hx, rtol=1e-3, atol=1e-3)


def test_fused_float32_close_to_reference():
    ref, fused = twins(
        torch.float32,
        input_size=16,
        hidden_size=12,
        num_layers=2,
        mogrify_rounds=5,
        mogrify_rank=4,
        state_dropout=0.2,
    )
    x, hx = inputs(16, 2, torch.float32, T=20, B=5, hidden=12)
    assert_twins_agree(ref, fused, x, hx, rtol=1e-4, atol=1e-5)


def test_no_grad_inference_and_unbatched():
    ref, fused = twins(input_size=5, hidden_size=4, num_layers=2, mogrify_rounds=3)
    x = torch.randn(6, 5, dtype=D)
    with torch.no_grad():
        a, (ha, ca) = ref(x)
        b, (hb, cb) = fused(x)
    for p, q in ((a, b), (ha, hb), (ca, cb)):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12)


def test_state_carried_across_windows():
    _, fused = twins(input_size=5, hidden_size=4, num_layers=2, mogrify_rounds=5, mogrify_rank=2)
    x = torch.randn(10, 3, 5, dtype=D)
    out, (h, c) = fused(x)
    out1, hx = fused(x[:4])
    out2, (h2, c2) = fused(x[4:], hx)
    torch.testing.assert_close(torch.cat([out1, out2]), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)


def test_auto_picks_fused_for_tensors_and_reference_for_packed():
    rnn = MogrifierLSTM(5, 4, mogrify_rounds=2)
    loop = backends.step_loop(torch.zeros(1))

    def picked(x, grad=True):
        steps = Steps(x, None) if isinstance(x, torch.Tensor) else Steps(x.data, x.batch_sizes)
        with torch.set_grad_enabled(grad):
            return rnn.backend_for(steps).name

    assert picked(torch.randn(3, 2, 5)) == loop.name
    # inference, a few steps: the reference loop is faster
    assert picked(torch.randn(3, 2, 5), grad=False) == "reference"
    # inference over a window: the compiled loop, where there is one
    compiled = _kernels.loop_available(torch.zeros(1))
    assert picked(torch.randn(8, 2, 5), grad=False) == (
        "compiled-loop" if compiled else "reference"
    )
    packed = pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 1]))
    assert picked(packed) == "reference"
    rnn.to(torch.bfloat16)  # no compiled loop in bfloat16: the torch-ops loop
    assert picked(torch.randn(3, 2, 5, dtype=torch.bfloat16)) == "torch-loop"
    assert picked(torch.randn(9, 2, 5, dtype=torch.bfloat16), grad=False) == "reference"


def test_one_backend_runs_every_layer_direction(monkeypatch):
    rnn = MogrifierLSTM(5, 4, num_layers=2, bidirectional=True, mogrify_rounds=2)
    calls = []
    for backend in (backends.REFERENCE, backends.step_loop(torch.zeros(1))):
        original = backend.run

        def spy(*args, _name=backend.name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend, "run", spy)
    rnn(torch.randn(3, 2, 5))
    assert calls == [backends.step_loop(torch.zeros(1)).name] * 4
    calls.clear()
    rnn(pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 1])))
    assert calls == ["reference"] * 4


def test_fused_refuses_what_it_cannot_do():
    rnn = MogrifierLSTM(5, 4, mogrify_rounds=2, implementation="fused")
    with pytest.raises(ValueError, match="packed"):
        rnn(pack_padded_sequence(torch.randn(3, 2, 5), torch.tensor([3, 1])))
    with pytest.raises(ValueError, match="implementation"):
        MogrifierLSTM(5, 4, implementation="cuda")


def test_kernels_are_used_when_built(pointwise):
    assert _kernels.available(torch.randn(3, 2, 5)) == (pointwise != "torch-ops")
    assert _kernels.loop_available(torch.randn(3, 2, 5)) == (pointwise == "compiled-loop")
    assert not _kernels.available(torch.randn(3, dtype=torch.bfloat16))
    assert not _kernels.loop_available(torch.randn(3, dtype=torch.bfloat16))


def test_kernel_loader_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("MOGLSTM_KERNEL_CACHE", str(tmp_path))
    _kernels.load.cache_clear()
    try:
        monkeypatch.setenv("MOGLSTM_NO_KERNELS", "1")
        assert _kernels.load() is None
        _kernels.load.cache_clear()
        monkeypatch.delenv("MOGLSTM_NO_KERNELS")
        monkeypatch.setattr(_kernels, "_compiler", lambda: "false")  # a compiler that fails
        # said once, never silent: the step loop that runs changes the last bits
        with pytest.warns(RuntimeWarning, match="could not be built with false.*last bits"):
            assert _kernels.load() is None
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.c"))
    finally:
        _kernels.load.cache_clear()


def test_loading_the_kernels_keeps_subnormal_floats():
    """A library linked with -ffast-math would switch on flush-to-zero process-wide."""
    _kernels.load()
    assert torch.tensor(1e-39) * 1.0 != 0  # a subnormal float32
    assert 5e-324 * 1.5 != 0  # the smallest subnormal double, through SSE arithmetic
