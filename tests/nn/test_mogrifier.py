"""The Mogrifier against the paper's equations, written out independently here."""

import pytest
import torch

from moglstm.nn import Mogrifier
from moglstm.nn import functional as mf  # moglstm's; "F" is always torch's


def full_matrix(mog: Mogrifier, i: int) -> torch.Tensor:
    if mog.rank is None:
        return getattr(mog, f"weight_{i}")
    return getattr(mog, f"weight_{i}_left") @ getattr(mog, f"weight_{i}_right")


def paper_mogrify(mog: Mogrifier, x: torch.Tensor, h: torch.Tensor):
    """Eq. (1)-(2) of Melis et al. (2020), one example at a time, matrix-vector form."""
    xs, hs = [], []
    for b in range(x.shape[0]):
        xb, hb = x[b].clone(), h[b].clone()
        for i in range(1, mog.rounds + 1):
            m = full_matrix(mog, i)
            bias = getattr(mog, f"bias_{i}")
            bias = torch.zeros(m.shape[0], dtype=x.dtype) if bias is None else bias
            if i % 2 == 1:
                xb = 2 * torch.sigmoid(torch.mv(m, hb) + bias) * xb
            else:
                hb = 2 * torch.sigmoid(torch.mv(m, xb) + bias) * hb
        xs.append(xb)
        hs.append(hb)
    return torch.stack(xs), torch.stack(hs)


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_paper_equations(rounds, rank, bias):
    torch.manual_seed(rounds)
    mog = Mogrifier(7, 5, rounds, rank=rank, bias=bias).double()
    with torch.no_grad():
        for name, p in mog.named_parameters():
            if name.startswith("bias"):
                p.normal_()  # biases start at zero; make them matter
    x, h = torch.randn(4, 7, dtype=torch.double), torch.randn(4, 5, dtype=torch.double)
    got_x, got_h = mog(x, h)
    want_x, want_h = paper_mogrify(mog, x, h)
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)


def test_one_round_gates_only_x():
    mog = Mogrifier(4, 3, 1)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    xm, hm = mog(x, h)
    assert torch.equal(hm, h)
    assert not torch.allclose(xm, x)


def test_each_round_has_its_own_matrix():
    mog = Mogrifier(4, 4, 4)
    weights = mog.round_weights()
    assert len({w.data_ptr() for w in weights}) == 4
    assert len(list(mog.parameters())) == 8


def test_zero_weights_and_biases_are_identity():
    for rank in (None, 2):
        mog = Mogrifier(6, 5, 5, rank=rank)
        with torch.no_grad():
            for p in mog.parameters():
                p.zero_()
        x, h = torch.randn(3, 6), torch.randn(3, 5)
        xm, hm = mog(x, h)
        assert torch.equal(xm, x) and torch.equal(hm, h)


def test_zero_rounds_is_identity_and_has_no_parameters():
    mog = Mogrifier(6, 5, 0)
    x, h = torch.randn(3, 6), torch.randn(3, 5)
    assert list(mog.parameters()) == []
    xm, hm = mog(x, h)
    assert xm is x and hm is h


def test_low_rank_shapes_and_counts():
    mog = Mogrifier(10, 8, 3, rank=2)
    assert mog.weight_1_left.shape == (10, 2) and mog.weight_1_right.shape == (2, 8)
    assert mog.weight_2_left.shape == (8, 2) and mog.weight_2_right.shape == (2, 10)
    n = sum(p.numel() for p in mog.parameters())
    assert n == 3 * 2 * (10 + 8) + (10 + 8 + 10)  # three factor pairs, three biases


def test_init_variance_is_one_over_fan_in():
    torch.manual_seed(0)
    for rank in (None, 16):
        mog = Mogrifier(400, 300, 2, rank=rank)
        q = full_matrix(mog, 1)  # (400, 300): fan-in 300
        r = full_matrix(mog, 2)  # (300, 400): fan-in 400
        assert q.var().item() == pytest.approx(1 / 300, rel=0.1)
        assert r.var().item() == pytest.approx(1 / 400, rel=0.1)
        assert torch.all(mog.bias_1 == 0)


def test_init_starts_close_to_identity():
    torch.manual_seed(0)
    mog = Mogrifier(64, 64, 5, rank=8)
    x, h = torch.randn(32, 64) * 0.3, torch.randn(32, 64) * 0.3
    xm, _ = mog(x, h)
    gate = xm / x
    assert 0.7 < gate.mean().item() < 1.3
    assert gate.std().item() < 0.5


def test_unbatched_matches_batched():
    mog = Mogrifier(4, 3, 5, rank=2)
    x, h = torch.randn(4), torch.randn(3)
    xm, hm = mog(x, h)
    xb, hb = mog(x[None], h[None])
    torch.testing.assert_close(xm, xb[0])
    torch.testing.assert_close(hm, hb[0])


def test_in_front_of_gru_cell():
    mog = Mogrifier(input_size=10, hidden_size=20, rounds=5, rank=4)
    cell = torch.nn.GRUCell(10, 20)
    x, h = torch.randn(3, 10), torch.zeros(3, 20)
    for _ in range(3):
        h = cell(*mog(x, h))
    assert h.shape == (3, 20)


def test_gradcheck():
    torch.manual_seed(0)
    mog = Mogrifier(4, 3, 4, rank=2).double()
    x = torch.randn(2, 4, dtype=torch.double, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.double, requires_grad=True)
    params = list(mog.parameters())

    def fn(x, h, *ps):
        weights = [(ps[3 * i], ps[3 * i + 1]) for i in range(4)]
        biases = [ps[3 * i + 2] for i in range(4)]
        return mf.mogrify(x, h, weights, biases)

    assert torch.autograd.gradcheck(fn, (x, h, *[p.detach().requires_grad_() for p in params]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rounds": -1}, "rounds"),
        ({"rank": 5}, "rank"),
        ({"rank": 0}, "rank"),
        ({"rounds": 2.0}, "rounds"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"input_size": 6, "hidden_size": 5, "rounds": 2} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        Mogrifier(**args)


def test_bad_inputs():
    mog = Mogrifier(6, 5, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        mog(torch.randn(3, 7), torch.randn(3, 5))
    with pytest.raises(ValueError, match="h must have shape"):
        mog(torch.randn(3, 6), torch.randn(2, 3, 5))  # a stacked state is not broadcast
    with pytest.raises(TypeError, match="dtype"):
        mog(torch.randn(3, 6), torch.randn(3, 5, dtype=torch.double))
    with pytest.raises(TypeError, match="floating"):
        mog(torch.ones(3, 6, dtype=torch.long), torch.randn(3, 5))
