"""Second derivatives are right on every path (create_graph=True, gradgradcheck)."""

import pytest
import torch

from moglstm.nn import MogrifierLSTM, _kernels

D = torch.double
PATHS = ["reference", "fused-compiled-loop", "fused-python-loop"]


@pytest.fixture(params=PATHS)
def implementation(request, monkeypatch):
    """The module's implementation on each path (the fused one with each step loop)."""
    if request.param == "fused-compiled-loop" and not _kernels.loop_available(torch.zeros(1)):
        pytest.skip("no compiled step loop here")
    if request.param == "fused-python-loop":
        monkeypatch.setattr(_kernels, "loop_available", lambda t: False)
    return request.param.split("-")[0]


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


def test_second_backward_through_retained_graph(implementation):
    rnn = small(implementation)
    x = torch.randn(4, 2, 3, dtype=D, requires_grad=True)
    loss = rnn(x)[0].pow(2).sum()
    first = torch.autograd.grad(loss, [x, *rnn.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *rnn.parameters()])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
