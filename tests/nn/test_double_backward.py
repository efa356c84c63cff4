"""Second derivatives are right on every path (create_graph=True, gradgradcheck), and
backward is reentrant: every backward through one graph gives the same bits, so
gradcheck and gradgradcheck pass with their default settings (nondet_tol=0)."""

import pytest
import torch

from moglstm.nn import MogrifierLSTM, _kernels
from moglstm.nn.backends import select
from moglstm.nn.direction import Steps

D = torch.double
# the fused path with each step loop: the compiled C loop, the Python loop with the C
# pointwise kernels, the Python loop of torch ops (bfloat16 weights, no C compiler)
PATHS = ["reference", "fused-compiled-loop", "fused-python-loop", "fused-torch-loop"]
LOOPS = {"fused-compiled-loop": "compiled-loop", "fused-python-loop": "torch-loop+c-kernels"}


@pytest.fixture(params=PATHS)
def implementation(request, monkeypatch):
    """The module's implementation on each path (the fused one with each step loop)."""
    if request.param == "fused-compiled-loop" and not _kernels.loop_available(torch.zeros(1)):
        pytest.skip("no compiled step loop here")
    if request.param == "fused-python-loop" and not _kernels.available(torch.zeros(1)):
        pytest.skip("no C kernels here")
    if request.param in ("fused-python-loop", "fused-torch-loop"):
        monkeypatch.setattr(_kernels, "loop_available", lambda t: False)
    if request.param == "fused-torch-loop":
        monkeypatch.setattr(_kernels, "available", lambda t: False)
    name = request.param.split("-")[0]
    expected = LOOPS.get(request.param, "torch-loop" if name == "fused" else "reference")
    assert select(name, Steps(torch.zeros(2, 1, 1, dtype=D), None), True).name == expected
    return name


def small(implementation, **kw):
    torch.manual_seed(0)
    kw = {"mogrify_rounds": 3, "mogrify_rank": 2, **kw}
    return MogrifierLSTM(3, 3, implementation=implementation, **kw).to(D)


@pytest.mark.parametrize(
    "variant", [{}, {"peephole": True, "cap_input_gate": True}, {"mogrify_rounds": 0}]
)
def test_gradgradcheck(implementation, variant):
    rnn = small(implementation, **variant)
    params = list(rnn.parameters())
    x = torch.randn(3, 2, 3, dtype=D, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=D, requires_grad=True)

    def f(x, h0, *ps):
        out, (h, c) = torch.func.functional_call(
            rnn, dict(zip([n for n, _ in rnn.named_parameters()], ps, strict=True)), (x, (h0, h0))
        )
        return out, h, c

    assert torch.autograd.gradgradcheck(f, (x, h0, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_maml_meta_gradient_equals_reference():
    """A MAML step: the meta-gradient through an inner SGD step matches the reference
    path's on each path, and differs from first-order MAML (second-order terms exist)."""
    results = {}
    for name, loop in [("reference", True), ("fused", True), ("fused", False)]:
        rnn = small(name)
        torch.manual_seed(1)
        x, y = torch.randn(4, 2, 3, dtype=D), torch.randn(4, 2, 3, dtype=D)
        with pytest.MonkeyPatch.context() as mp:
            if not loop:
                mp.setattr(_kernels, "loop_available", lambda t: False)
            names = [n for n, _ in rnn.named_parameters()]
            params = list(rnn.parameters())
            inner = ((rnn(x)[0] - y) ** 2).sum()
            grads = torch.autograd.grad(inner, params, create_graph=True)
            fast = {n: p - 0.1 * g for n, p, g in zip(names, params, grads, strict=True)}
            outer = ((torch.func.functional_call(rnn, fast, (y,))[0] - x) ** 2).sum()
            results[(name, loop)] = torch.autograd.grad(outer, params)
    ref = results[("reference", True)]
    for key, grads in results.items():
        for a, b in zip(ref, grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=str(key))


@pytest.mark.parametrize("dtype", [D, torch.float32])
def test_second_backward_through_retained_graph_gives_the_same_bits(implementation, dtype):
    rnn = small(implementation, num_layers=2, bidirectional=True).to(dtype)
    x = torch.randn(4, 2, 3, dtype=dtype, requires_grad=True)
    out, (h, c) = rnn(x)
    loss = out.pow(2).sum() + c.sum()
    wrt = [x, *rnn.parameters()]
    first = torch.autograd.grad(loss, wrt, retain_graph=True)
    second = torch.autograd.grad(loss, wrt, retain_graph=True)
    third = torch.autograd.grad(loss, wrt)
    for a, b, c in zip(first, second, third, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_second_backward_through_retained_graph_under_autocast():
    """CPU autocast runs the fused path's Python loop in bfloat16: a second backward through
    the retained graph works and gives the same bits."""
    rnn = small("auto", num_layers=2).float()
    x = torch.randn(9, 2, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rnn(x)[0].float().pow(2).sum()
    first = torch.autograd.grad(loss, [x, *rnn.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *rnn.parameters()])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


SLOW = pytest.mark.slow  # a few seconds each: the fast suite keeps one model of 2 layers


@pytest.mark.parametrize(
    "layers, bidirectional",
    [
        (1, False),
        (1, True),
        (2, False),
        pytest.param(2, True, marks=SLOW),
        pytest.param(3, False, marks=SLOW),
        pytest.param(3, True, marks=SLOW),
    ],
)
def test_gradcheck_and_gradgradcheck_with_default_settings(implementation, layers, bidirectional):
    """torch's checks as a user's own test calls them: default tolerances, nondet_tol=0
    (two backwards through one graph must agree to the bit), slow mode."""
    torch.manual_seed(0)
    rnn = MogrifierLSTM(
        2, 2, layers, bidirectional=bidirectional, mogrify_rounds=2, implementation=implementation
    ).to(D)
    x = torch.randn(2, 1, 2, dtype=D, requires_grad=True)
    h0 = torch.randn(layers * (1 + bidirectional), 1, 2, dtype=D, requires_grad=True)

    def f(x, h0):
        out, (h, c) = rnn(x, (h0, h0))
        return out, c

    assert torch.autograd.gradcheck(f, (x, h0))
    assert torch.autograd.gradgradcheck(f, (x, h0))


def test_gradcheck_with_default_settings_on_the_default_implementation():
    """The user's view: a default-built model (``"auto"``: the fused node when autograd
    records), two layers, bidirectional, checked on its input, state and weights."""
    torch.manual_seed(0)
    rnn = MogrifierLSTM(2, 2, 2, bidirectional=True, mogrify_rounds=2, mogrify_rank=1).to(D)
    names = [n for n, _ in rnn.named_parameters()]
    x = torch.randn(2, 1, 2, dtype=D, requires_grad=True)
    h0 = torch.randn(4, 1, 2, dtype=D, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in rnn.parameters()][:6]

    def f(x, h0, *ws):
        params = dict(zip(names, ws, strict=False))
        return torch.func.functional_call(rnn, params, (x, (h0, h0)), strict=False)[0]

    assert rnn.backend_for(Steps(x, None)).name == select("fused", Steps(x, None), True).name
    assert torch.autograd.gradcheck(f, (x, h0, *weights))
    assert torch.autograd.gradgradcheck(f, (x, h0))
