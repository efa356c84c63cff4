"""Tests for moglstm.lm.models: one interface over recurrent and Transformer language models."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from moglstm.lm.config import ModelConfig, TransformerSettings, model_config
from moglstm.lm.models import (
    LockedDropout,
    RNNLanguageModel,
    TransformerLanguageModel,
    build_model,
    count_parameters,
    detach_state,
)
from moglstm.nn import MogrifierLSTM

VOCAB = 23
T, B = 12, 3

# Small configurations of every model kind (and every Mogrifier cell variant).
RNN_CONFIGS = {
    "mogrifier": dict(kind="mogrifier", mogrify_rounds=4),
    "mogrifier-rank": dict(kind="mogrifier", mogrify_rounds=5, mogrify_rank=3),
    "mogrifier-coupled": dict(kind="mogrifier", coupled=True),
    "mogrifier-peephole": dict(kind="mogrifier", peephole=True),
    "mogrifier-cap": dict(kind="mogrifier", cap_input_gate=True),
    "mogrifier-0-rounds": dict(kind="mogrifier", mogrify_rounds=0),
    "lstm": dict(kind="lstm"),
    "gru": dict(kind="gru"),
    "rnn": dict(kind="rnn"),
}
DROPOUTS = ("embedding_dropout", "input_dropout", "layer_dropout", "output_dropout")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP spinning makes them up to 40x slower; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_rnn(name: str = "lstm", **overrides) -> RNNLanguageModel:
    kwargs = dict(hidden_size=16, embedding_size=16, num_layers=2, **RNN_CONFIGS[name])
    kwargs.update(overrides)
    return RNNLanguageModel(VOCAB, model_config(**kwargs))


def make_transformer(positional: str = "sinusoidal", **overrides) -> TransformerLanguageModel:
    """``positional``: "sinusoidal", "learned" or "none" (the settings' two fields)."""
    kwargs = dict(d_model=16, heads=2, depth=2, ffn_size=32, max_len=32, dropout=0.0)
    kwargs.update(overrides)
    if positional != "none":
        kwargs["positional_kind"] = positional
    settings = TransformerSettings(positional=positional != "none", **kwargs)
    return TransformerLanguageModel(VOCAB, settings)


def make_any(name: str) -> nn.Module:
    return make_transformer() if name == "transformer" else make_rnn(name)


def tokens(length: int = T, batch: int = B, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (length, batch), generator=g)


def state_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in state_tensors(s)]


def pre_hook_capture(module: nn.Module) -> tuple[list[torch.Tensor], object]:
    """Record the first positional input of every call to ``module``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen, handle


# --------------------------------------------------------------------------- shapes, state


@pytest.mark.parametrize("name", [*RNN_CONFIGS, "transformer"])
def test_shapes_every_kind(name):
    torch.manual_seed(0)
    model = make_any(name)
    logits, state = model(tokens())
    assert logits.shape == (T, B, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    if name == "transformer":
        assert state is None
        assert model.init_state(B, "cpu") is None
    else:
        assert len(state) == 2
        expected = 2 if RNN_CONFIGS[name]["kind"] in ("mogrifier", "lstm") else 1
        assert all(t.shape == (1, B, 16) for t in state_tensors(state))
        assert len(state_tensors(state)) == 2 * expected


@pytest.mark.parametrize("name", RNN_CONFIGS)
def test_state_carried_equals_one_call(name):
    torch.manual_seed(0)
    model = make_rnn(name).eval()
    x = tokens(length=10)
    with torch.no_grad():
        whole, whole_state = model(x)
        first, state = model(x[:4])
        second, split_state = model(x[4:], detach_state(state))
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(state_tensors(split_state), state_tensors(whole_state), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", RNN_CONFIGS)
def test_init_state_is_zero_state(name):
    torch.manual_seed(0)
    model = make_rnn(name).eval()
    state = model.init_state(B, "cpu")
    assert all(t.shape == (1, B, 16) and not t.any() for t in state_tensors(state))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens(), state)[0], model(tokens())[0])


def test_state_carries_information():
    # A nonzero incoming state must change the output (the state is really used).
    torch.manual_seed(0)
    model = make_rnn("mogrifier").eval()
    with torch.no_grad():
        _, state = model(tokens(seed=1))
        assert not torch.allclose(model(tokens(), state)[0], model(tokens())[0])


def test_bad_state_rejected():
    model = make_rnn("lstm")
    with pytest.raises(ValueError, match="list of 2"):
        model(tokens(), [None])
    with pytest.raises(ValueError, match="keeps no state"):
        make_transformer()(tokens(), [torch.zeros(1)])


@pytest.mark.parametrize(
    "bad, error",
    [
        (torch.zeros(T, B), ValueError),  # float, not long
        (torch.zeros(T, dtype=torch.long), ValueError),  # 1-D
        (torch.zeros(0, B, dtype=torch.long), ValueError),  # empty
        ([[1, 2]], TypeError),  # not a tensor
    ],
)
def test_bad_tokens_rejected(bad, error):
    for model in (make_rnn("lstm"), make_transformer()):
        with pytest.raises(error, match="tokens"):
            model(bad)


def test_layers_are_one_module_per_layer():
    mog, lstm, gru, rnn = (make_rnn(n, num_layers=3) for n in ("mogrifier", "lstm", "gru", "rnn"))
    assert len(mog.layers) == 3 and all(isinstance(m, MogrifierLSTM) for m in mog.layers)
    assert all(type(m) is nn.LSTM and m.num_layers == 1 for m in lstm.layers)
    assert all(type(m) is nn.GRU for m in gru.layers)
    assert all(type(m) is nn.RNN and m.nonlinearity == "tanh" for m in rnn.layers)
    # First layer reads the embedding, the others the hidden size.
    wide = make_rnn("lstm", embedding_size=8, hidden_size=12)
    assert wide.layers[0].input_size == 8 and wide.layers[1].input_size == 12


def test_detach_state_any_structure():
    a = torch.ones(2, requires_grad=True) * 2
    pair = namedtuple("pair", "h c")
    state = [(a, a), a, {"k": a}, pair(a, a), None]
    out = detach_state(state)
    assert isinstance(out, list) and isinstance(out[0], tuple) and isinstance(out[3], pair)
    assert out[4] is None
    leaves = [*out[0], out[1], out[2]["k"], *out[3]]
    assert all(not t.requires_grad and torch.equal(t, a.detach()) for t in leaves)
    assert detach_state(None) is None
    assert not detach_state(a).requires_grad
    with pytest.raises(TypeError, match="unsupported state type"):
        detach_state("state")


def test_detach_state_cuts_graph_across_windows():
    torch.manual_seed(0)
    model = make_rnn("lstm")
    _, state = model(tokens())
    logits, _ = model(tokens(seed=1), detach_state(state))
    logits.sum().backward()  # would fail on a freed graph if the state were not detached
    logits, _ = model(tokens(seed=2), detach_state(state))
    logits.sum().backward()
    assert model.embedding.weight.grad is not None


# --------------------------------------------------------------------------- tying, counting


def test_tied_weights_are_one_tensor():
    model = make_rnn("lstm")
    assert model.decoder.weight is model.embedding.weight
    assert model.projection is None
    transformer = make_transformer()
    assert transformer.decoder.weight is transformer.embedding.weight
    untied = make_rnn("lstm", tie_weights=False)
    assert untied.decoder.weight is not untied.embedding.weight


def test_projection_when_sizes_differ():
    model = make_rnn("mogrifier", embedding_size=8, hidden_size=16)
    assert model.decoder.weight is model.embedding.weight
    assert model.projection.weight.shape == (8, 16)
    assert model(tokens())[0].shape == (T, B, VOCAB)
    untied = make_rnn("lstm", embedding_size=8, hidden_size=16, tie_weights=False)
    assert untied.projection is None and untied.decoder.weight.shape == (VOCAB, 16)


def test_tied_gradient_flows_from_both_ends():
    model = make_rnn("lstm")
    logits, _ = model(tokens())
    logits.sum().backward()
    grad = model.embedding.weight.grad
    unused = sorted(set(range(VOCAB)) - set(tokens().flatten().tolist()))
    # Rows of tokens never fed in still get a gradient through the tied softmax.
    assert unused and grad[unused].abs().sum() > 0


def test_count_parameters_counts_tied_once():
    tied, untied = make_rnn("lstm"), make_rnn("lstm", tie_weights=False)
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 16
    naive = sum(p.numel() for _, p in tied.named_parameters(remove_duplicate=False))
    assert naive - count_parameters(tied) == VOCAB * 16
    tied.embedding.weight.requires_grad_(False)
    assert count_parameters(tied, trainable_only=True) == count_parameters(tied) - VOCAB * 16
    assert count_parameters(nn.Linear(3, 2)) == 8
    with pytest.raises(TypeError, match="model"):
        count_parameters("model")


# --------------------------------------------------------------------------- dropout


def with_dropout(name: str, field: str, p: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """A model with dropout ``field=p`` and the same model (same weights) without it."""
    torch.manual_seed(0)
    dropped = make_rnn(name, **{field: p})
    plain = make_rnn(name)
    plain.load_state_dict(dropped.state_dict())
    return dropped, plain


@pytest.mark.parametrize(
    "name, field",
    [("lstm", f) for f in DROPOUTS]
    + [("gru", "layer_dropout"), ("mogrifier", "state_dropout"), ("mogrifier", "input_dropout")],
)
def test_dropout_acts_in_train_mode_only(name, field):
    dropped, plain = with_dropout(name, field)
    x = tokens()
    torch.manual_seed(1)
    assert not torch.allclose(dropped(x)[0], plain(x)[0])  # train mode: plain has no dropout
    dropped.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x)[0], plain(x)[0])


def test_dropout_draws_new_mask_per_call():
    torch.manual_seed(0)
    model = make_rnn("lstm", input_dropout=0.5)
    x = tokens()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_locked_dropout_mask_shared_over_time():
    torch.manual_seed(0)
    drop = LockedDropout(0.5)
    out = drop(torch.ones(7, 4, 10))  # constant input: any change over t is the mask
    assert torch.equal(out, out[:1].expand_as(out))
    assert set(out.unique().tolist()) == {0.0, 2.0}  # kept units rescaled by 1 / (1 - p)
    assert not torch.equal(out[0, 0], out[0, 1])  # but masks differ across the batch
    assert torch.equal(drop.eval()(torch.ones(7, 4, 10)), torch.ones(7, 4, 10))
    assert torch.equal(LockedDropout(0.0)(torch.ones(2, 2)), torch.ones(2, 2))


def test_input_dropout_is_variational_in_model():
    # A constant token sequence gives a constant embedding; after locked dropout it must
    # still be constant over time, with some units zeroed.
    torch.manual_seed(0)
    model = make_rnn("mogrifier", input_dropout=0.5)
    seen, handle = pre_hook_capture(model.layers[0])
    model(torch.full((T, B), 5, dtype=torch.long))
    handle.remove()
    x = seen[0]  # (T, B, E)
    assert torch.equal(x, x[:1].expand_as(x))
    assert (x == 0).any() and (x != 0).any()


@pytest.mark.parametrize("field, site", [("layer_dropout", "layer"), ("output_dropout", "out")])
def test_layer_and_output_dropout_zero_same_units_each_step(field, site):
    torch.manual_seed(0)
    model = make_rnn("lstm", **{field: 0.5})
    module = model.layers[1] if site == "layer" else model.decoder
    seen, handle = pre_hook_capture(module)
    model(tokens())
    handle.remove()
    zeros = seen[0] == 0  # (T, B, H): hidden activations are never exactly zero otherwise
    assert zeros.any() and (~zeros).any()
    assert torch.equal(zeros, zeros[:1].expand_as(zeros))


def test_embedding_dropout_drops_whole_word_types():
    torch.manual_seed(0)
    p = 0.5
    model = make_rnn("lstm", embedding_dropout=p)
    x = torch.arange(VOCAB).repeat(4).view(-1, 2)  # every type appears 4 times
    seen, handle = pre_hook_capture(model.layers[0])
    model(x)
    handle.remove()
    emb = seen[0]  # (T, B, E)
    weight = model.embedding.weight.detach()
    dropped = []
    for word in range(VOCAB):
        rows = emb[x == word]  # (4, E): every occurrence of this type
        if (rows == 0).all():
            dropped.append(word)
        else:  # kept types are kept everywhere and rescaled
            torch.testing.assert_close(rows, (weight[word] / (1 - p)).expand_as(rows))
    assert 0 < len(dropped) < VOCAB


def test_embedding_dropout_leaves_tied_softmax_alone():
    # Dropping word types affects the input only: the decoder still scores every type.
    torch.manual_seed(0)
    model = make_rnn("lstm", embedding_dropout=0.9)
    logits, _ = model(tokens())
    logits.sum().backward()
    assert (model.decoder.weight.grad.abs().sum(1) > 0).all()


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(kind="transformer"), ValueError, "kind"),
        (dict(kind="lstm", state_dropout=0.1), ValueError, "state_dropout"),
        (dict(kind="gru", coupled=True), ValueError, "coupled"),
        (dict(kind="rnn", peephole=True), ValueError, "peephole"),
        (dict(kind="lstm", cap_input_gate=True), ValueError, "cap_input_gate"),
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(hidden_size=2.5), TypeError, "hidden_size"),
        (dict(embedding_size=-1), ValueError, "embedding_size"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(mogrify_rounds=-1), ValueError, "mogrifier.rounds"),
        (dict(mogrify_rank=0), ValueError, "mogrifier.rank"),
        (dict(input_dropout=1.0), ValueError, "input_dropout"),
        (dict(layer_dropout=-0.1), ValueError, "layer_dropout"),
        (dict(output_dropout="half"), TypeError, "output_dropout"),
        (dict(embedding_dropout=1.5), ValueError, "embedding_dropout"),
        (dict(state_dropout=1.0), ValueError, "state_dropout"),
    ],
)
def test_rnn_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RNNLanguageModel(VOCAB, model_config(**kwargs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d_model=10, heads=4), ValueError, "d_model=10 must be divisible by .*heads=4"),
        (dict(depth=0), ValueError, "depth"),
        (dict(ffn_size=0), ValueError, "ffn_size"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(positional="rotary"), ValueError, "positional_kind"),
    ],
)
def test_transformer_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_transformer(**kwargs)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(kind="bilstm"), ValueError, "kind"),
        (dict(kind="transformer", state_dropout=0.2), ValueError, "state_dropout"),
        (dict(kind="transformer", positional_kind="rope"), ValueError, "positional_kind"),
        (dict(kind="gru", state_dropout=0.2), ValueError, "state_dropout"),
        (dict(kind="lstm", num_layers=0), ValueError, "num_layers"),
    ],
)
def test_build_model_bad_config(changes, error, match):
    with pytest.raises(error, match=match):
        build_model(model_config(**changes), VOCAB)


def test_build_model_bad_arguments():
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model({"kind": "lstm"}, VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig(), 0)
    with pytest.raises(TypeError, match="batch_size"):
        make_rnn("lstm").init_state(2.0, "cpu")


# --------------------------------------------------------------------------- build_model


@pytest.mark.parametrize("kind", ["mogrifier", "lstm", "gru", "rnn"])
def test_build_model_recurrent(kind):
    cfg = model_config(
        kind=kind,
        hidden_size=12,
        embedding_size=8,
        num_layers=3,
        input_dropout=0.1,
        layer_dropout=0.2,
        output_dropout=0.3,
        embedding_dropout=0.05,
        mogrify_rounds=3,
    )
    model = build_model(cfg, VOCAB)
    assert isinstance(model, RNNLanguageModel) and model.kind == kind
    assert len(model.layers) == 3 and model.projection.weight.shape == (8, 12)
    assert (model.input_drop.p, model.layer_drop.p, model.output_drop.p) == (0.1, 0.2, 0.3)
    assert model.embedding_dropout == 0.05
    assert model.training
    assert model(tokens())[0].shape == (T, B, VOCAB)


def test_build_model_mogrifier_variants():
    cfg = model_config(hidden_size=8, num_layers=1, coupled=True, state_dropout=0.2)
    model = build_model(cfg, VOCAB)
    assert isinstance(model.layers[0], MogrifierLSTM)
    assert model.layers[0].hidden_size == 8


@pytest.mark.parametrize(
    "positional, positional_kind, learned_params",
    [(True, "sinusoidal", False), (True, "learned", True), (False, "learned", False)],
)
def test_build_model_transformer(positional, positional_kind, learned_params):
    cfg = model_config(
        kind="transformer",
        d_model=16,
        heads=4,
        depth=3,
        positional=positional,
        positional_kind=positional_kind,
        max_len=20,
    )
    model = build_model(cfg, VOCAB)
    assert isinstance(model, TransformerLanguageModel)
    assert len(model.blocks) == 3 and model.max_len == 20
    assert model.blocks[0].linear1.out_features == 64  # ffn_size None: 4 * d_model
    assert (model.position is not None) == learned_params
    assert model.positional == (positional_kind if positional else "none")
    assert model(tokens())[0].shape == (T, B, VOCAB)
    # The sinusoid table is rebuilt, not saved: checkpoints hold learned weights only.
    assert not any("sinusoid" in k for k in model.state_dict())


# --------------------------------------------------------------------------- transformer


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none"])
def test_transformer_is_causal(positional):
    torch.manual_seed(0)
    model = make_transformer(positional=positional).eval()
    x = tokens(length=10)
    y = x.clone()
    y[6] = (y[6] + 1) % VOCAB  # change one later token
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    torch.testing.assert_close(a[:6], b[:6])  # earlier positions never see it
    assert not torch.allclose(a[6:], b[6:])


def test_transformer_causal_in_train_mode_gradients():
    # Gradient of the loss at position t with respect to the inputs is zero beyond t.
    torch.manual_seed(0)
    model = make_transformer()
    emb = []

    def keep_grad(_module, _inputs, out):
        out.retain_grad()
        emb.append(out)

    model.embedding.register_forward_hook(keep_grad)
    logits, _ = model(tokens(length=8))
    logits[3].sum().backward()
    grad = emb[0].grad.abs().sum(dim=(1, 2))  # (T,)
    assert (grad[:4] > 0).all() and (grad[4:] == 0).all()


def test_recurrent_models_are_causal_too():
    torch.manual_seed(0)
    model = make_rnn("mogrifier").eval()
    x = tokens(length=8)
    y = x.clone()
    y[5] = (y[5] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][:5], model(y)[0][:5])


def test_transformer_max_len():
    model = make_transformer(max_len=8)
    assert model(tokens(length=8))[0].shape == (8, B, VOCAB)
    with pytest.raises(ValueError, match="9.*8"):
        model(tokens(length=9))


def test_transformer_positional_matters():
    # One token repeated: without positions every step attends over identical vectors and
    # gives the same logits; sinusoidal positions tell the steps apart.
    torch.manual_seed(0)
    x = torch.full((6, 1), 3, dtype=torch.long)
    with torch.no_grad():
        flat = make_transformer(positional="none").eval()(x)[0]
        sin = make_transformer(positional="sinusoidal").eval()(x)[0]
    torch.testing.assert_close(flat, flat[:1].expand_as(flat))  # same token, no position info
    assert not torch.allclose(sin, sin[:1].expand_as(sin))


def test_transformer_dropout_train_only():
    torch.manual_seed(0)
    model = make_transformer(dropout=0.3)
    x = tokens()
    assert not torch.allclose(model(x)[0], model(x)[0])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x)[0])


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    "name", ["mogrifier", "mogrifier-coupled", "lstm", "gru", "rnn", "transformer"]
)
def test_tiny_model_overfits_repeated_sequence(name):
    # "1" is followed by 4 or by 5: below ~0.17 nats the model must use context, not bigrams.
    torch.manual_seed(0)
    model = make_any(name)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    data = pattern.repeat(2).view(-1, 1).repeat(1, 2)  # (16, 2)
    inputs, targets = data[:-1], data[1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01 if name == "transformer" else 0.05)
    losses = []
    for _ in range(40):
        logits, _ = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses  # from ln(V) ~ 3.1 to below 0.63


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["mogrifier", "lstm", "transformer"])
def test_cuda_autocast(name):
    torch.manual_seed(0)
    model = make_any(name).cuda()
    x = tokens().cuda()
    state = model.init_state(B, "cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        logits, state = model(x, state)
        logits, _ = model(x, detach_state(state))
    assert logits.shape == (T, B, VOCAB) and logits.is_cuda
    logits.float().sum().backward()
    assert torch.isfinite(model.embedding.weight.grad).all()
