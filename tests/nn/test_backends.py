"""The backend seam: one description of a layer direction, plain fused entry points."""

import pytest
import torch

from moglstm.nn import MogrifierLSTM, _kernels, backends
from moglstm.nn.direction import Direction, DirectionSpec, Steps

D = torch.double


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mogrify_rounds": 0},
        {"mogrify_rounds": 3, "peephole": True, "coupled": True},
        {"mogrify_rounds": 4, "mogrify_rank": 2, "bias": False, "cap_input_gate": True},
    ],
)
def test_direction_round_trips_through_flat_and_spec_ints(kwargs):
    rnn = MogrifierLSTM(5, 4, **kwargs)
    d = rnn.direction(0, 0)
    assert DirectionSpec.decode(d.spec.encode()) == d.spec
    again = Direction.from_flat(d.spec, d.flat())
    assert [a is b for a, b in zip(again.flat(), d.flat(), strict=True)] == [True] * len(d.flat())
    assert d.spec.rounds == kwargs["mogrify_rounds"]
    assert d.spec.gate_rows == (12 if kwargs.get("coupled") else 16)
    with pytest.raises(ValueError, match="more weight tensors"):
        Direction.from_flat(d.spec, [*d.flat(), torch.zeros(1)])


def step_loops():
    x = torch.zeros(1, dtype=D)
    found = {backends.TORCH_LOOP, backends.step_loop(x)}
    if _kernels.available(x):
        found.add(backends.TORCH_LOOP_KERNELS)
    return sorted(found, key=lambda b: b.name)


@pytest.mark.parametrize("backend", step_loops(), ids=lambda b: b.name)
def test_fused_entry_points_are_plain_functions(backend):
    """forward/backward without autograd: what a custom op wraps, equal to the reference."""
    torch.manual_seed(0)
    rnn = MogrifierLSTM(5, 4, mogrify_rounds=5, mogrify_rank=2, peephole=True).to(D)
    d = rnn.direction(0, 0)
    T, B = 6, 3
    x, h0, c0 = (
        torch.randn(T, B, 5, dtype=D),
        torch.randn(B, 4, dtype=D),
        torch.randn(B, 4, dtype=D),
    )
    mask = torch.rand(B, 4, dtype=D) * 2
    flat = tuple(p.detach() for p in d.flat())
    with torch.no_grad():
        out, h_n, c_n, saved = backend.forward(d.spec, x, h0, c0, mask, flat)
    assert all(isinstance(t, torch.Tensor) for t in saved)
    d_out, d_h, d_c = (torch.randn_like(t) for t in (out, h_n, c_n))
    dx, dh0, dc0, grads = backend.backward(d.spec, x, mask, flat, saved, d_out, d_h, d_c)
    inputs = [t.clone().requires_grad_() for t in (x, h0, c0, *flat)]
    ref_d = Direction.from_flat(d.spec, inputs[3:])
    ref = backends.REFERENCE.run(Steps(inputs[0], None), inputs[1], inputs[2], ref_d, False, mask)
    for a, b in zip(ref, (out, h_n, c_n), strict=True):
        torch.testing.assert_close(b, a.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad(ref, inputs, (d_out, d_h, d_c))
    for a, b in zip(want, (dx, dh0, dc0, *grads), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_select_rejects_unknown_and_unsupported():
    steps = Steps(torch.zeros(3, 2, 5, dtype=torch.float8_e4m3fn), None)
    with pytest.raises(ValueError, match="implementation must be one of"):
        backends.select("cuda", steps, True)
    with pytest.raises(ValueError, match="does not support dtype"):
        backends.select("fused", steps, True)
    assert backends.select("auto", steps, True) is backends.REFERENCE


def test_the_toolkit_config_offers_every_implementation():
    """The config checks model.mogrifier.implementation against this very list (written once)."""
    from moglstm.lm.config import checks

    assert checks.IMPLEMENTATIONS is backends.IMPLEMENTATIONS
