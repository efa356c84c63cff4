"""The evaluation protocol: dynamic evaluation, softmax temperature, Monte-Carlo dropout."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from moglstm import cli
from moglstm.lm.config import load_config
from moglstm.lm.data import batchify, load_corpus
from moglstm.lm.dynamic_eval import DynamicEvalSettings, dynamic_evaluate, gradient_statistics
from moglstm.lm.evaluate import (
    TEMPERATURE_GRID,
    evaluate,
    evaluate_loss,
    score_split,
    search_temperature,
)
from moglstm.lm.runs.folder import load_run
from moglstm.lm.train import train
from tests.conftest import grammar_sentence

ADAPT = DynamicEvalSettings(lr=1e-3, decay=1e-3)  # tuned for the tiny model below


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LSTM trained on the grammar corpus, whose valid and test splits each
    repeat a handful of sentences: a shift that adapting to the split pays off on."""
    root = tmp_path_factory.mktemp("shifted")
    rng = random.Random(0)
    lines = [grammar_sentence(rng) for _ in range(300)]
    (root / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split in ("valid", "test"):
        few = [grammar_sentence(rng) for _ in range(6)]
        text = "\n".join(rng.choice(few) for _ in range(60)) + "\n"
        (root / f"{split}.txt").write_text(text, encoding="utf-8")
    cfg = load_config(
        None,
        [
            "data.corpus=text",
            f"data.path={root}",
            "data.batch_size=8",
            "data.bptt=10",
            "model.kind=lstm",
            "model.hidden_size=24",
            "model.output_dropout=0.2",
            "train.max_steps=100",
            "train.eval_every=100",
            "train.lr=0.01",
            "train.device=cpu",
            f"out_dir={root / 'runs'}",
            "name=shifted",
        ],
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, quiet=True)
    finally:
        torch.set_num_threads(previous)
    return root / "runs" / "shifted"


def split_data(run_dir: Path, split: str, batch_size: int = 1):
    loaded = load_run(run_dir, "last")
    corpus = load_corpus(loaded.config.data, vocab=loaded.vocab)
    return loaded, corpus, batchify(corpus.split(split), batch_size)


# --------------------------------------------------------------------------- dynamic evaluation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(lr=0), ValueError),
        (dict(eps=-1.0), ValueError),
        (dict(decay=-0.1), ValueError),
        (dict(bptt=0), ValueError),
        (dict(grad_batches=0), ValueError),
        (dict(lr="fast"), TypeError),
        (dict(bptt=2.5), TypeError),
    ],
)
def test_dynamic_settings_are_checked(kwargs, error):
    with pytest.raises(error):
        DynamicEvalSettings(**kwargs)


def test_gradient_statistics_are_mean_squares_and_leave_the_model_alone(shifted_run):
    loaded, corpus, _ = split_data(shifted_run, "test")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    train_data = batchify(corpus.train, 8)
    ms = gradient_statistics(loaded.model, train_data, 10, max_batches=3)
    params = list(loaded.model.parameters())
    assert [m.shape for m in ms] == [p.shape for p in params]
    assert all((m >= 0).all() for m in ms) and any(m.sum() > 0 for m in ms)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k])
    # by hand: the mean over the first 3 windows of the squared gradient
    model = loaded.model
    state, total = None, [torch.zeros_like(p) for p in params]
    for w in range(3):
        x, y = train_data[w * 10 : w * 10 + 10], train_data[w * 10 + 1 : w * 10 + 11]
        model.zero_grad()
        logits, state = model(x, state)
        nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        state = [(h.detach(), c.detach()) for h, c in state]
        total = [t + p.grad.square() for t, p in zip(total, params, strict=True)]
    for m, t in zip(ms, total, strict=True):
        assert torch.allclose(m, t / 3, rtol=1e-4, atol=1e-10)


def test_dynamic_evaluation_lowers_test_perplexity_of_a_trained_model(shifted_run):
    loaded, corpus, test = split_data(shifted_run, "test")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    static, count = evaluate_loss(loaded.model, test, ADAPT.bptt)
    ms = gradient_statistics(loaded.model, batchify(corpus.train, 8), 10)
    dynamic, dyn_count = dynamic_evaluate(loaded.model, test, ms, ADAPT)
    assert dyn_count == count == corpus.test.numel() - 1  # every token scored once
    assert dynamic < static - 0.15  # nats per token: perplexity down by more than 14%
    for k, v in loaded.model.state_dict().items():  # the trained weights are restored
        assert torch.equal(v, before[k])


def test_dynamic_evaluation_without_steps_is_static_evaluation(shifted_run):
    loaded, corpus, test = split_data(shifted_run, "test")
    static, _ = evaluate_loss(loaded.model, test, 5)
    ms = gradient_statistics(loaded.model, batchify(corpus.train, 8), 10, max_batches=5)
    frozen, _ = dynamic_evaluate(loaded.model, test, ms, DynamicEvalSettings(lr=1e-12, decay=0))
    assert math.isclose(frozen, static, rel_tol=1e-5)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        dynamic_evaluate(loaded.model, test, ms[:-1])


def test_evaluate_runs_dynamic_evaluation_from_a_run_folder(shifted_run):
    plain = evaluate(shifted_run, "test", batch_size=1, device="cpu", checkpoint="last")
    dynamic = evaluate(
        shifted_run, "test", batch_size=1, device="cpu", checkpoint="last", dynamic=ADAPT
    )
    assert dynamic["ppl"] < 0.87 * plain["ppl"]
    assert dynamic["tokens"] == plain["tokens"]
    assert dynamic["dynamic"]["lr"] == ADAPT.lr and plain["dynamic"] is None
    with pytest.raises(ValueError, match="cannot be combined"):
        evaluate(shifted_run, "test", device="cpu", dynamic=ADAPT, mc_samples=2)


# --------------------------------------------------------------------------- temperature


def test_temperature_search_picks_a_better_or_equal_temperature(shifted_run):
    loaded, _, valid = split_data(shifted_run, "valid")
    best, table = search_temperature(loaded.model, valid, 10, max_tokens=200)
    assert set(table) == set(TEMPERATURE_GRID) and best in table
    assert table[best] <= table[1.0]
    assert table[best] == min(table.values())
    # each entry is the loss of the logits divided by that temperature
    (at_best,), _ = score_split(loaded.model, valid, 10, temperatures=[best], max_tokens=200)
    assert math.isclose(at_best, table[best], rel_tol=1e-9)


def test_score_split_at_temperature_one_is_plain_evaluation(shifted_run):
    loaded, _, valid = split_data(shifted_run, "valid", batch_size=3)
    plain, count = evaluate_loss(loaded.model, valid, 7)
    (same, sharp), count2 = score_split(loaded.model, valid, 7, temperatures=[1.0, 0.5])
    assert count == count2 and same == plain  # one code path: the same bits
    assert sharp != same


def test_evaluate_applies_the_searched_temperature(shifted_run):
    auto = evaluate(
        shifted_run, "test", batch_size=1, device="cpu", temperature="auto", temperature_tokens=200
    )
    assert auto["temperature"] in TEMPERATURE_GRID
    fixed = evaluate(
        shifted_run, "test", batch_size=1, device="cpu", temperature=auto["temperature"]
    )
    assert math.isclose(auto["loss"], fixed["loss"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="'auto'"):
        evaluate(shifted_run, "test", device="cpu", temperature="hot")
    with pytest.raises(ValueError, match="positive"):
        evaluate(shifted_run, "test", device="cpu", temperature=0.0)


# --------------------------------------------------------------------------- Monte-Carlo dropout


class _Alternating(nn.Module):
    """A fake model whose prediction depends on the call: sample i predicts token i."""

    stateful = True

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, tokens, state=None):
        t, b = tokens.shape
        logits = torch.full((t, b, 2), -30.0)
        logits[..., self.calls % 2] = 0.0  # almost surely token (calls % 2)
        self.calls += 1
        return logits + self.weight, state


def test_monte_carlo_evaluation_averages_probabilities_not_log_probabilities():
    data = torch.zeros(5, 1, dtype=torch.long)  # the target is always token 0
    (loss,), _ = score_split(_Alternating(), data, 4, mc_samples=2)
    # one sample gives p = 1, the other p ~ 0: the mean probability is 1/2
    assert math.isclose(loss, math.log(2), rel_tol=1e-6)


def test_monte_carlo_with_dropout_scaled_to_zero_is_deterministic(shifted_run):
    loaded, _, valid = split_data(shifted_run, "valid", batch_size=2)
    plain, _ = evaluate_loss(loaded.model, valid, 10)
    (mc,), _ = score_split(loaded.model, valid, 10, mc_samples=3, mc_dropout_scale=0.0)
    assert math.isclose(mc, plain, rel_tol=1e-6)
    (noisy,), _ = score_split(loaded.model, valid, 10, mc_samples=3)
    assert noisy != plain and math.isfinite(noisy)
    assert not loaded.model.training  # left in eval mode
    assert loaded.model.output_drop.p == 0.2  # rates restored


def test_evaluate_reports_monte_carlo_samples(shifted_run):
    result = evaluate(shifted_run, "valid", batch_size=1, device="cpu", mc_samples=2)
    assert result["mc_samples"] == 2 and math.isfinite(result["loss"])


# --------------------------------------------------------------------------- command line


def test_cli_evaluate_takes_the_protocol_options(shifted_run, capsys):
    args = ["evaluate", str(shifted_run), "--split", "test", "--batch-size", "1", "--json"]
    assert cli.main([*args, "--temperature", "auto", "--temperature-tokens", "200"]) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["temperature"] in TEMPERATURE_GRID
    dyn = ["--dynamic", "--dynamic-lr", "1e-3", "--dynamic-decay", "1e-3", "--dynamic-bptt", "5"]
    assert cli.main([*args, *dyn, "--dynamic-grad-batches", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dynamic"] == {
        "lr": 1e-3,
        "decay": 1e-3,
        "eps": DynamicEvalSettings().eps,
        "bptt": 5,
        "grad_batches": 20,
    }
    assert cli.main([*args, "--temperature", "warm"]) == 2
    assert "--temperature 'warm'" in capsys.readouterr().err
