"""MogrifierLSTMCell: torch parity, variants, gradients and argument checks."""

import pytest
import torch

from moglstm.nn import MogrifierLSTMCell
from moglstm.nn import functional as mf  # moglstm's; "F" is always torch's

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
VARIANTS = [
    {},
    {"coupled": True},
    {"peephole": True},
    {"cap_input_gate": True},
    {"coupled": True, "peephole": True},
    {"peephole": True, "cap_input_gate": True},
]


def torch_pair(bias=True):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(5, 4, bias=bias).double()
    cell = MogrifierLSTMCell(5, 4, bias=bias, mogrify_rounds=0).double()
    cell.load_state_dict(ref.state_dict())
    return ref, cell


@pytest.mark.parametrize("bias", [True, False])
def test_zero_rounds_equals_torch_lstm_cell(bias):
    ref, cell = torch_pair(bias)
    x = torch.randn(3, 5, dtype=torch.double)
    hx = (torch.randn(3, 4, dtype=torch.double), torch.randn(3, 4, dtype=torch.double))
    for a, b in zip(ref(x, hx), cell(x, hx), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    (sum(t.sum() for t in ref(x, hx))).backward()
    (sum(t.sum() for t in cell(x, hx))).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, getattr(cell, name).grad, **TIGHT)


def test_hx_none_is_zeros_and_unbatched_works():
    ref, cell = torch_pair()
    x = torch.randn(5, dtype=torch.double)
    for a, b in zip(ref(x), cell(x), strict=True):
        assert b.shape == (4,)
        torch.testing.assert_close(a, b, **TIGHT)
    zeros = (torch.zeros(4, dtype=torch.double),) * 2
    for a, b in zip(cell(x), cell(x, zeros), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_torch_state_dict_loads_with_mogrifier_non_strict():
    ref = torch.nn.LSTMCell(5, 4)
    cell = MogrifierLSTMCell(5, 4, mogrify_rounds=3)
    missing, unexpected = cell.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("mogrifier.") for k in missing)
    assert torch.equal(cell.weight_hh, ref.weight_hh)


def reference_step(cell, x, h, c):
    """The cell's step written out from the equations, gate by gate."""
    xm, hm = mf.mogrify(x, h, cell.mogrifier.round_weights(), cell.mogrifier.round_biases())
    z = xm @ cell.weight_ih.T + hm @ cell.weight_hh.T
    if cell.bias:
        z = z + cell.bias_ih + cell.bias_hh
    H = cell.hidden_size
    if cell.coupled:
        zf, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H :]
    else:
        zi, zf, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
    if cell.peephole:
        zf = zf + cell.weight_cf * c
        if not cell.coupled:
            zi = zi + cell.weight_ci * c
    f, g = torch.sigmoid(zf), torch.tanh(zg)
    if cell.coupled:
        c2 = f * c + (1 - f) * g
    elif cell.cap_input_gate:
        c2 = f * c + torch.minimum(1 - f, torch.sigmoid(zi)) * g
    else:
        c2 = f * c + torch.sigmoid(zi) * g
    if cell.peephole:
        zo = zo + cell.weight_co * c2
    return torch.sigmoid(zo) * torch.tanh(c2), c2


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_their_equations(variant):
    torch.manual_seed(1)
    cell = MogrifierLSTMCell(5, 4, mogrify_rounds=3, mogrify_rank=2, **variant).double()
    x, h, c = (torch.randn(3, n, dtype=torch.double) for n in (5, 4, 4))
    for a, b in zip(cell(x, (h, c)), reference_step(cell, x, h, c), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


def test_coupled_has_no_input_gate_weights():
    cell = MogrifierLSTMCell(5, 4, coupled=True, peephole=True)
    assert cell.weight_ih.shape == (12, 5) and cell.weight_hh.shape == (12, 4)
    assert not hasattr(cell, "weight_ci")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank", [None, 2])
def test_gradcheck(variant, rank):
    torch.manual_seed(2)
    cell = MogrifierLSTMCell(4, 3, mogrify_rounds=3, mogrify_rank=rank, **variant).double()
    names = [n for n, _ in cell.named_parameters()]
    x, h, c = (torch.randn(2, n, dtype=torch.double, requires_grad=True) for n in (4, 3, 3))

    def fn(x, h, c, *params):
        state = dict(zip(names, params, strict=True))
        out = torch.func.functional_call(cell, state, (x, (h, c)))
        return out

    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h, c, *params))


def outputs(**kwargs):
    torch.manual_seed(3)
    args = {"input_size": 6, "hidden_size": 5, "mogrify_rounds": 5} | kwargs
    cell = MogrifierLSTMCell(**args)
    torch.manual_seed(4)
    x = torch.randn(2, args["input_size"])
    h, c = torch.randn(2, args["hidden_size"]), torch.randn(2, args["hidden_size"])
    return torch.cat(cell(x, (h, c)), -1)


@pytest.mark.parametrize(
    "change",
    [
        {"mogrify_rounds": 4},
        {"mogrify_rounds": 0},
        {"mogrify_rank": 2},
        {"bias": False},
        {"coupled": True},
        {"peephole": True},
        {"cap_input_gate": True},
    ],
)
def test_every_argument_has_an_effect(change):
    base = outputs()
    assert not torch.allclose(base, outputs(**change))


def test_size_arguments_and_dtype_device_take_effect():
    cell = MogrifierLSTMCell(6, 5, dtype=torch.double, device="cpu")
    h, c = cell(torch.randn(2, 6, dtype=torch.double))
    assert h.shape == (2, 5) and h.dtype == torch.double and h.device.type == "cpu"


def test_bad_arguments():
    with pytest.raises(ValueError, match="mogrify_rank"):
        MogrifierLSTMCell(6, 5, mogrify_rank=5)
    with pytest.raises(ValueError, match="mogrify_rounds"):
        MogrifierLSTMCell(6, 5, mogrify_rounds=-1)
    with pytest.raises(ValueError, match="hidden_size"):
        MogrifierLSTMCell(6, 0)
    with pytest.raises(ValueError, match="coupled"):
        MogrifierLSTMCell(6, 5, coupled=True, cap_input_gate=True)


def test_bad_inputs():
    cell = MogrifierLSTMCell(6, 5)
    with pytest.raises(ValueError, match="input must have shape"):
        cell(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"hx\[0\] must have shape"):
        cell(torch.randn(3, 6), (torch.randn(2, 3, 5), torch.randn(3, 5)))
    with pytest.raises(ValueError, match=r"hx\[1\] must have shape"):
        cell(torch.randn(3, 6), (torch.randn(3, 5), torch.randn(1, 5)))
    with pytest.raises(TypeError, match="dtype"):
        cell(torch.randn(3, 6, dtype=torch.double))
    with pytest.raises(TypeError, match=r"hx\[0\] has dtype"):
        cell(torch.randn(3, 6), (torch.randn(3, 5, dtype=torch.double), torch.randn(3, 5)))
    with pytest.raises(TypeError, match="pair"):
        cell(torch.randn(3, 6), torch.randn(3, 5))
