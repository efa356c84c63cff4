"""The paper's model options: dropout masks, skip connections, forget bias, mixture of
softmaxes, embedding ratio, and the paper presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from moglstm.lm.budget import parse_count
from moglstm.lm.config import load_config, load_preset, model_config, validate
from moglstm.lm.layers import LockedDropout, MixtureOfSoftmaxes
from moglstm.lm.models import RNNLanguageModel, build_model, count_parameters
from moglstm.nn import functional as nnF

VOCAB, T, B, H = 19, 7, 3, 12
PAPER_PRESETS = {  # preset: vocabulary size of its corpus
    "ptb-paper": 10_000,
    "ptb-paper-lstm": 10_000,
    "wt2-paper": 33_278,
    "wt2-paper-lstm": 33_278,
    "ptb-char-paper": 51,
    "ptb-char-paper-lstm": 51,
    "enwik8-paper": 256,
    "enwik8-paper-lstm": 256,
    "enwik8-96m-paper": 256,
    "enwik8-96m-paper-lstm": 256,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(VOCAB, (T, B), generator=torch.Generator().manual_seed(seed))


def model(**kwargs) -> RNNLanguageModel:
    args = dict(hidden_size=H, num_layers=2, mogrify_rounds=2, implementation="reference")
    args.update(kwargs)
    return RNNLanguageModel(VOCAB, model_config(**args))


# --------------------------------------------------------------------------- dropout masks


def test_locked_dropout_shares_a_mask_over_time_only_when_asked():
    x = torch.ones(50, 4, 30)
    window = LockedDropout(0.5, "window").train()(x)
    assert torch.equal(window, window[:1].expand_as(window))  # same mask at every step
    step = LockedDropout(0.5, "step").train()(x)
    assert not torch.equal(step[0], step[1])  # a fresh mask at each step
    for out in (window, step):
        assert set(out.unique().tolist()) <= {0.0, 2.0}  # kept units rescaled by 1 / (1 - p)
    assert torch.equal(LockedDropout(0.5, "step").eval()(x), x)
    with pytest.raises(ValueError, match="mask"):
        LockedDropout(0.5, "sometimes")


def _state_masks(monkeypatch, m: RNNLanguageModel) -> list[torch.Tensor]:
    """Zero patterns of the h fed into each step's mogrifier (= the state dropout mask)."""
    seen = []
    original = nnF.mogrify

    def spy(x, h, *args, **kwargs):
        seen.append(h.detach() == 0)
        return original(x, h, *args, **kwargs)

    monkeypatch.setattr(nnF, "mogrify", spy)
    m.train()
    m(tokens())
    return seen[1:T]  # first layer, steps 1..T-1 (step 0 starts from a zero state)


def test_state_dropout_mask_is_shared_within_a_window_when_asked(monkeypatch):
    torch.manual_seed(0)
    m = model(num_layers=1, state_dropout=0.5, dropout_mask="window")
    masks = _state_masks(monkeypatch, m)
    assert all(torch.equal(masks[0], k) for k in masks)
    assert 0.3 < masks[0].float().mean().item() < 0.7  # about half of h is dropped


def test_state_dropout_mask_is_fresh_at_every_step_when_asked(monkeypatch):
    torch.manual_seed(0)
    m = model(num_layers=1, state_dropout=0.5, dropout_mask="step")
    masks = _state_masks(monkeypatch, m)
    assert len({tuple(k.flatten().tolist()) for k in masks}) == len(masks)  # all different
    assert 0.3 < torch.stack(masks).float().mean().item() < 0.7


def test_step_masks_do_not_change_evaluation():
    torch.manual_seed(0)
    window = model(state_dropout=0.3, input_dropout=0.3, output_dropout=0.3).eval()
    step = model(state_dropout=0.3, input_dropout=0.3, output_dropout=0.3, dropout_mask="step")
    step.load_state_dict(window.state_dict())
    step.eval()
    x = tokens()
    assert torch.allclose(window(x)[0], step(x)[0], atol=1e-6)


# --------------------------------------------------------------------------- architecture


def test_sum_layer_outputs_feeds_the_sum_of_every_layer_to_the_softmax():
    torch.manual_seed(0)
    m = model(num_layers=3, sum_layer_outputs=True).eval()
    outs = []
    for layer in m.layers:
        layer.register_forward_hook(lambda mod, inp, out: outs.append(out[0]))
    logits, _ = m(tokens())
    assert torch.allclose(logits, m.decoder(sum(outs)), atol=1e-6)
    plain = model(num_layers=3).eval()
    plain.load_state_dict(m.state_dict())
    outs.clear()
    for layer in plain.layers:
        layer.register_forward_hook(lambda mod, inp, out: outs.append(out[0]))
    assert torch.allclose(plain(tokens())[0], plain.decoder(outs[-1]), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "rows"),
    [
        (dict(kind="mogrifier"), slice(H, 2 * H)),
        (dict(kind="mogrifier", coupled=True), slice(0, H)),  # gates (f, g, o)
        (dict(kind="lstm"), slice(H, 2 * H)),
    ],
)
def test_forget_bias_is_added_to_the_forget_gate_only(kwargs, rows):
    torch.manual_seed(3)
    base = model(**kwargs)
    torch.manual_seed(3)
    shifted = model(forget_bias=1.5, **kwargs)
    for a, b in zip(base.layers, shifted.layers, strict=True):
        diff = b.bias_hh_l0 - a.bias_hh_l0
        expected = torch.zeros_like(diff)
        expected[rows] = 1.5
        assert torch.allclose(diff, expected)
        assert torch.equal(a.bias_ih_l0, b.bias_ih_l0)
    with pytest.raises(ValueError, match="forget gate"):
        model(kind="gru", forget_bias=1.0, mogrify_rounds=0)


def test_embedding_ratio_sets_the_embedding_and_projects_before_the_tied_softmax():
    m = build_model(model_config(hidden_size=40, embedding_ratio=0.2), VOCAB)
    assert m.embedding.weight.shape == (VOCAB, 8)
    assert m.decoder.weight is m.embedding.weight
    assert m.projection.weight.shape == (8, 40)
    assert m.layers[0].input_size == 8


# --------------------------------------------------------------------------- mixture of softmaxes


def test_mixture_of_softmaxes_returns_normalised_log_probabilities():
    torch.manual_seed(0)
    mos = MixtureOfSoftmaxes(H, 6, components=3)
    decoder = nn.Linear(6, VOCAB)
    logp = mos(torch.randn(T, B, H), decoder)
    assert logp.shape == (T, B, VOCAB)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(T, B), atol=1e-5)  # sums to 1
    # so cross_entropy on them is the negative log-probability of the target
    target = torch.randint(VOCAB, (T * B,))
    flat = logp.reshape(-1, VOCAB)
    assert torch.allclose(
        F.cross_entropy(flat, target), -flat.gather(1, target[:, None]).mean(), atol=1e-6
    )


def test_mixture_of_softmaxes_is_the_weighted_sum_of_its_components():
    torch.manual_seed(1)
    mos = MixtureOfSoftmaxes(H, 5, components=2).eval()
    decoder = nn.Linear(5, VOCAB)
    h = torch.randn(1, 1, H)
    pi = F.softmax(mos.prior(h), -1)[0, 0]  # (K,)
    z = torch.tanh(mos.latent(h)).view(2, 5)
    expected = sum(pi[k] * F.softmax(decoder(z[k]), -1) for k in range(2))
    assert torch.allclose(mos(h, decoder)[0, 0].exp(), expected, atol=1e-6)


def test_language_model_with_a_mixture_ties_its_decoder_and_trains():
    torch.manual_seed(0)
    m = model(mos_components=3, mos_dropout=0.2, embedding_size=6)
    assert m.returns_log_probs and m.projection is None
    assert m.decoder.weight is m.embedding.weight
    names = [n for n, _ in m.named_parameters()]
    assert "mos.prior.weight" in names and not any(n.startswith("mos.decoder") for n in names)
    x = tokens()
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        logp, _ = m(x[:-1])
        loss = F.cross_entropy(logp.reshape(-1, VOCAB), x[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    m.eval()
    assert torch.allclose(m(x)[0].exp().sum(-1), torch.ones(T, B), atol=1e-5)


def test_mixture_dropout_follows_the_mask_choice():
    mos = MixtureOfSoftmaxes(H, 6, components=2, dropout=0.5, dropout_mask="step")
    assert mos.drop.mask == "step" and mos.drop.p == 0.5
    with pytest.raises(ValueError):
        MixtureOfSoftmaxes(H, 6, components=1)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dropout_mask=sometimes"], "model.dropout_mask='sometimes'"),
        (["model.drop_state_probability=1.5"], "model.drop_state_probability=1.5"),
        (["model.mos_components=0"], "model.output.mos_components=0"),
        (["model.mos_dropout=0.2"], "needs model.output.mos_components > 1"),
        (["model.embedding_ratio=0.5", "model.embedding_size=10"], "alternatives"),
        (["model.embedding_ratio=-1"], "model.embedding_ratio=-1"),
        (["model.kind=gru", "model.forget_bias=1"], "needs a forget gate"),
        (["model.kind=transformer", "model.mos_components=2"], "needs a recurrent"),
        (["model.kind=transformer", "model.sum_layer_outputs=true"], "needs a recurrent"),
        (["train.l2=-1"], "train.l2=-1"),
        (["train.average_after_bad_evals=-1"], "train.average_after_bad_evals"),
        (["train.average_from_step=-3"], "train.average_from_step"),
    ],
)
def test_config_rejects_bad_paper_settings(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_config_fields_reach_the_model():
    cfg = model_config(
        hidden_size=10,
        mogrify_rounds=1,
        dropout_mask="step",
        sum_layer_outputs=True,
        forget_bias=1.0,
        mos_components=2,
        mos_dropout=0.1,
    )
    m = build_model(cfg, VOCAB)
    assert m.dropout_mask == "step" and m.input_drop.mask == "step"
    assert m.sum_layer_outputs and m.mos.components == 2 and m.mos.drop.p == 0.1


# --------------------------------------------------------------------------- paper presets


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_preset_validates_and_lands_within_one_percent_of_its_budget(name):
    cfg = load_config(name)
    validate(cfg)
    assert cfg.name == name
    budget = parse_count(cfg.model.num_params)
    vocab = PAPER_PRESETS[name]
    with torch.device("meta"):  # the full-size model, without allocating it
        built = build_model(cfg.model, vocab)
    total = count_parameters(built, trainable_only=True)  # the official counts trainables
    assert total <= budget
    assert abs(total - budget) / budget < 0.01, (name, built.hidden_size, total)


@pytest.mark.parametrize(
    "name", ["ptb-paper", "wt2-paper", "ptb-char-paper", "enwik8-paper", "enwik8-96m-paper"]
)
def test_each_lstm_twin_shares_the_budget_data_and_training(name):
    mog, lstm = load_preset(name), load_preset(f"{name}-lstm")
    assert lstm.model.mogrifier.rounds == 0 and mog.model.mogrifier.rounds > 0
    assert lstm.model.num_params == mog.model.num_params
    assert lstm.data == mog.data
    assert lstm.model.num_layers == mog.model.num_layers
    assert lstm.model.output.tie_weights == mog.model.output.tie_weights
    assert lstm.train.max_steps == mog.train.max_steps
