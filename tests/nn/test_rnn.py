"""MogrifierLSTM: the torch.nn.LSTM contract, packed sequences, state and checks."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from moglstm.nn import MogrifierLSTM, MogrifierLSTMCell

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
D = torch.double


def pair(num_layers, bidirectional, batch_first, **kw):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(5, 4, num_layers, bidirectional=bidirectional, batch_first=batch_first)
    mine = MogrifierLSTM(
        5,
        4,
        num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        mogrify_rounds=0,
        **kw,
    )
    ref, mine = ref.double(), mine.double()
    mine.load_state_dict(ref.state_dict())  # strict: same names and shapes
    return ref, mine


def total(out):
    output, (h, c) = out
    data = output.data if hasattr(output, "batch_sizes") else output
    return (data * torch.arange(1, data.shape[-1] + 1, dtype=D)).sum() + h.sum() * 2 + c.sum() * 3


def assert_same_grads(ref, mine):
    for name, p in ref.named_parameters():
        torch.testing.assert_close(getattr(mine, name).grad, p.grad, **TIGHT)


@pytest.mark.parametrize(
    "num_layers, bidirectional, batch_first",
    list(itertools.product([1, 2], [False, True], [False, True])),
)
def test_zero_rounds_equals_torch_lstm(num_layers, bidirectional, batch_first):
    ref, mine = pair(num_layers, bidirectional, batch_first)
    x = torch.randn(3, 6, 5, dtype=D)
    hx = tuple(torch.randn(num_layers * (1 + bidirectional), 3, 4, dtype=D) for _ in range(2))
    if not batch_first:
        x = x.transpose(0, 1)
    a, b = ref(x, hx), mine(x, hx)
    torch.testing.assert_close(a[0], b[0], **TIGHT)
    torch.testing.assert_close(a[1], b[1], **TIGHT)
    total(a).backward()
    total(b).backward()
    assert_same_grads(ref, mine)


@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_zero_rounds_equals_torch_on_packed(num_layers, bidirectional, enforce_sorted):
    ref, mine = pair(num_layers, bidirectional, batch_first=True)
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([2, 6, 1, 4])
    x = torch.randn(4, 6, 5, dtype=D)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    hx = tuple(torch.randn(num_layers * (1 + bidirectional), 4, 4, dtype=D) for _ in range(2))
    a, b = ref(packed, hx), mine(packed, hx)
    assert type(b[0]) is type(a[0])
    torch.testing.assert_close(a[0].data, b[0].data, **TIGHT)
    torch.testing.assert_close(a[1], b[1], **TIGHT)
    total(a).backward()
    total(b).backward()
    assert_same_grads(ref, mine)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_padding_never_matters(bidirectional):
    torch.manual_seed(1)
    rnn = MogrifierLSTM(
        5,
        4,
        2,
        bidirectional=bidirectional,
        batch_first=True,
        mogrify_rounds=5,
        mogrify_rank=2,
        peephole=True,
    ).double()
    lengths = torch.tensor([3, 6, 1])
    x = torch.randn(3, 6, 5, dtype=D)
    noisy = x.clone()
    for b, n in enumerate(lengths):
        noisy[b, n:] = 1e3  # garbage in the padding
    outs = []
    for inp in (x, noisy):
        packed = pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = rnn(packed)
        outs.append((pad_packed_sequence(out, batch_first=True)[0], h, c))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # each sequence alone gives the same output and final state
    padded, h, c = outs[0]
    for b, n in enumerate(lengths.tolist()):
        o1, (h1, c1) = rnn(x[b : b + 1, :n])
        torch.testing.assert_close(padded[b, :n], o1[0], **TIGHT)
        torch.testing.assert_close(h[:, b], h1[:, 0], **TIGHT)
        torch.testing.assert_close(c[:, b], c1[:, 0], **TIGHT)
        assert torch.all(padded[b, n:] == 0)


def test_layer_equals_cell_loop():
    torch.manual_seed(2)
    rnn = MogrifierLSTM(5, 4, mogrify_rounds=5, mogrify_rank=3, cap_input_gate=True).double()
    cell = MogrifierLSTMCell(5, 4, mogrify_rounds=5, mogrify_rank=3, cap_input_gate=True).double()
    state = {k.replace("_l0", ""): v for k, v in rnn.state_dict().items()}
    cell.load_state_dict(state)
    x = torch.randn(7, 3, 5, dtype=D)
    out, (h, c) = rnn(x)
    hc = None
    for t in range(7):
        hc = cell(x[t], hc)
        torch.testing.assert_close(out[t], hc[0], **TIGHT)
    torch.testing.assert_close(h[0], hc[0], **TIGHT)
    torch.testing.assert_close(c[0], hc[1], **TIGHT)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_two_halves_with_state_equal_whole(bidirectional):
    torch.manual_seed(3)
    rnn = MogrifierLSTM(5, 4, 2, mogrify_rounds=5, mogrify_rank=2).double()
    x = torch.randn(10, 3, 5, dtype=D)
    out, (h, c) = rnn(x)
    out1, hx = rnn(x[:6])
    out2, (h2, c2) = rnn(x[6:], hx)
    torch.testing.assert_close(torch.cat([out1, out2]), out, **TIGHT)
    torch.testing.assert_close(h2, h, **TIGHT)
    torch.testing.assert_close(c2, c, **TIGHT)


def test_unbatched_and_shapes():
    rnn = MogrifierLSTM(5, 4, 2, bidirectional=True, mogrify_rank=2)
    out, (h, c) = rnn(torch.randn(7, 5))
    assert out.shape == (7, 8) and h.shape == (4, 4) and c.shape == (4, 4)
    outb, (hb, cb) = rnn(torch.randn(7, 1, 5))
    assert outb.shape == (7, 1, 8) and hb.shape == (4, 1, 4)
    x = torch.randn(7, 5)
    torch.testing.assert_close(rnn(x)[0], rnn(x[:, None])[0][:, 0])


def test_gradcheck_module():
    torch.manual_seed(4)
    rnn = MogrifierLSTM(
        3, 2, 2, bidirectional=True, mogrify_rounds=3, peephole=True, implementation="reference"
    ).double()
    names = [n for n, _ in rnn.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in rnn.parameters()]
    x = torch.randn(4, 2, 3, dtype=D, requires_grad=True)

    def fn(x, *ps):
        out, (h, c) = torch.func.functional_call(rnn, dict(zip(names, ps, strict=True)), (x,))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_state_dropout_masks_the_fed_back_state_only_in_training():
    torch.manual_seed(5)
    rnn = MogrifierLSTM(5, 4, mogrify_rounds=2, state_dropout=0.5)
    x = torch.randn(6, 3, 5)
    rnn.eval()
    base = rnn(x)[0]
    rnn.state_dropout = 0.0
    torch.testing.assert_close(rnn(x)[0], base)  # eval: no effect
    rnn.state_dropout = 0.5
    rnn.train()
    dropped = rnn(x)[0]
    torch.testing.assert_close(dropped[0], base[0])  # h_0 = 0: the first step is unaffected
    assert not torch.allclose(dropped[1:], base[1:])


def test_state_dropout_uses_one_mask_per_call():
    torch.manual_seed(6)
    rnn = MogrifierLSTM(2, 64, mogrify_rounds=0, state_dropout=0.5)
    with torch.no_grad():  # h_t = 0.5 tanh(... weight_hh . h) visible through a huge weight
        for p in rnn.parameters():
            p.zero_()
        rnn.bias_ih_l0[3 * 64 :] = 100.0  # o = 1
        rnn.bias_ih_l0[:64] = 100.0  # i = 1
        rnn.bias_ih_l0[128:192] = 0.5  # g = tanh(0.5 + W_hg h)
        rnn.weight_hh_l0[128:192] = torch.eye(64) * 1e-3  # a small channel of h into g
    x = torch.zeros(5, 1, 2)
    rnn.train()
    out = rnn(x)[0][:, 0]
    rnn.eval()
    clean = rnn(x)[0][:, 0]
    # a kept unit feeds back 2h (> h), a dropped one 0 (< h): the sign of the change
    # shows the mask, and it must be the same at every step of the call
    signs = torch.sign(out[1:] - clean[1:])
    assert (signs[0] > 0).any() and (signs[0] < 0).any()
    assert torch.equal(signs, signs[:1].expand_as(signs))
    rnn.train()
    assert not torch.equal(torch.sign(rnn(x)[0][1:, 0] - clean[1:]), signs)  # new call, new mask


def test_dropout_between_layers():
    torch.manual_seed(7)
    x = torch.randn(4, 3, 5)
    one = MogrifierLSTM(5, 4, 1, dropout=0.5).train()
    assert torch.equal(one(x)[0], one(x)[0])  # one layer: dropout has nothing to act on
    two = MogrifierLSTM(5, 4, 2, dropout=0.5).train()
    assert not torch.equal(two(x)[0], two(x)[0])
    two.eval()
    assert torch.equal(two(x)[0], two(x)[0])


def outputs(**kwargs):
    torch.manual_seed(8)
    args = {"input_size": 6, "hidden_size": 5, "num_layers": 2, "mogrify_rounds": 5} | kwargs
    rnn = MogrifierLSTM(**args).eval()
    torch.manual_seed(9)
    x = torch.randn(3, 7, args["input_size"])
    out, (h, c) = rnn(x)
    return out if out.shape[0] == 3 else out.transpose(0, 1), h


@pytest.mark.parametrize(
    "change",
    [
        {"mogrify_rounds": 4},
        {"mogrify_rank": 3},
        {"num_layers": 1},
        {"bias": False},
        {"batch_first": True},
        {"bidirectional": True},
        {"coupled": True},
        {"peephole": True},
        {"cap_input_gate": True},
    ],
)
def test_every_argument_has_an_effect(change):
    out, h = outputs()
    out2, h2 = outputs(**change)
    assert out.shape != out2.shape or h.shape != h2.shape or not torch.allclose(out, out2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dropout"):
        MogrifierLSTM(5, 4, dropout=1.0)
    with pytest.raises(ValueError, match="state_dropout"):
        MogrifierLSTM(5, 4, state_dropout=-0.1)
    with pytest.raises(ValueError, match="mogrify_rank"):
        MogrifierLSTM(5, 4, mogrify_rank=4)
    with pytest.raises(ValueError, match="mogrify_rounds"):
        MogrifierLSTM(5, 4, mogrify_rounds=-2)
    with pytest.raises(ValueError, match="num_layers"):
        MogrifierLSTM(5, 4, num_layers=0)


def test_bad_inputs():
    rnn = MogrifierLSTM(5, 4, 2)
    with pytest.raises(ValueError, match="5 features"):
        rnn(torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="2-D"):
        rnn(torch.randn(3, 2, 1, 5))
    with pytest.raises(ValueError, match=r"hx\[0\] must have shape \(2, 2, 4\)"):
        rnn(torch.randn(3, 2, 5), (torch.randn(1, 2, 4), torch.randn(2, 2, 4)))
    with pytest.raises(ValueError, match=r"hx\[1\]"):
        rnn(torch.randn(3, 2, 5), (torch.randn(2, 2, 4), torch.randn(2, 1, 4)))
    with pytest.raises(TypeError, match="dtype"):
        rnn(torch.randn(3, 2, 5, dtype=D))
    with pytest.raises(TypeError, match="floating"):
        rnn(torch.ones(3, 2, 5, dtype=torch.long))


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
@pytest.mark.parametrize("grad", [True, False])
def test_empty_batch_as_torch(implementation, grad):
    ref = torch.nn.LSTM(3, 4, 2, bidirectional=True)
    mine = MogrifierLSTM(3, 4, 2, bidirectional=True, implementation=implementation)
    x = torch.randn(5, 0, 3, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        a, (ha, ca) = ref(x)
        b, (hb, cb) = mine(x)
    assert (b.shape, hb.shape, cb.shape) == (a.shape, ha.shape, ca.shape)
    if grad:
        (b.sum() + hb.sum()).backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
@pytest.mark.parametrize(
    "shape, batch_first", [((0, 2, 3), False), ((2, 0, 3), True), ((0, 3), False)]
)
def test_empty_sequence_is_an_error_as_in_torch(implementation, shape, batch_first):
    with pytest.raises(RuntimeError, match="sequence length"):
        torch.nn.LSTM(3, 4, batch_first=batch_first)(torch.randn(*shape))
    rnn = MogrifierLSTM(3, 4, batch_first=batch_first, implementation=implementation)
    with pytest.raises(ValueError, match=r"sequence length > 0, got shape \(" + str(shape[0])):
        rnn(torch.randn(*shape))
