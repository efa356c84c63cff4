"""Parameter budgets: parsing counts, the size search, and model.num_params."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from moglstm.lm.budget import largest_fitting, parse_count
from moglstm.lm.config import ModelConfig, load_config, model_config
from moglstm.lm.models import build_model, count_parameters, resolve_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- parse_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24M", 24_000_000),
        ("24m", 24_000_000),
        ("24e6", 24_000_000),
        ("2.4e7", 24_000_000),
        ("24000000", 24_000_000),
        (24_000_000, 24_000_000),
        (2.4e7, 24_000_000),
        ("1.5k", 1500),
        (" 35M ", 35_000_000),
        ("1G", 10**9),
        ("1B", 10**9),
    ],
)
def test_parse_count_reads_every_spelling(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize(
    "text", ["", "M", "24 million", "24MM", "-5", "0", "1.5", "0.0005k", "nan"]
)
def test_parse_count_rejects_non_counts(text):
    with pytest.raises(ValueError, match=repr(text).replace("(", r"\(")):
        parse_count(text)


@pytest.mark.parametrize("value", [None, True, [24]])
def test_parse_count_rejects_other_types(value):
    with pytest.raises(TypeError):
        parse_count(value)


# --------------------------------------------------------------------------- the search


def test_largest_fitting_finds_the_exact_boundary():
    count = lambda n: 3 * n * n + 7 * n  # noqa: E731
    for budget in (10, 11, 1000, 123_456, 10**8):
        n = largest_fitting(count, budget)
        assert count(n) <= budget < count(n + 1)


def test_largest_fitting_skips_sizes_that_cannot_be_built():
    count = lambda n: None if n < 50 else 10 * n  # noqa: E731
    assert largest_fitting(count, 1234) == 123
    with pytest.raises(ValueError, match="too small.*size 50"):
        largest_fitting(count, 499)


def test_largest_fitting_reports_impossible_searches():
    with pytest.raises(ValueError, match="no size up to 8"):
        largest_fitting(lambda n: None, 100, high=8)
    assert largest_fitting(lambda n: n, 100, high=8) == 8  # everything fits: the top
    with pytest.raises(ValueError, match="budget"):
        largest_fitting(lambda n: n, 0)


# --------------------------------------------------------------------------- model.num_params


def _count(cfg: ModelConfig, vocab: int) -> int:
    return count_parameters(build_model(cfg, vocab))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"mogrify_rank": 6, "mogrify_rounds": 4},
        {"kind": "lstm"},
        {"kind": "gru", "num_layers": 3},
        {"embedding_ratio": 0.5, "mos_components": 3},
        {"tie_weights": False, "peephole": True},
    ],
)
def test_num_params_picks_the_largest_hidden_size_that_fits(extra):
    # small budgets: the models are really built (on the CPU) to check the meta count
    cfg = model_config(num_params="60k", hidden_size=7, **extra)
    hidden, embedding = resolve_sizes(cfg, 100)
    built = build_model(cfg, 100)
    assert built.hidden_size == hidden
    total = count_parameters(built)
    assert total <= 60_000
    assert abs(total - 60_000) / 60_000 < 0.05  # tiny models step coarsely
    bigger = dataclasses.replace(cfg, num_params=None, hidden_size=hidden + 1)
    if cfg.embedding_ratio is not None:
        bigger = dataclasses.replace(bigger, embedding_ratio=cfg.embedding_ratio)
    assert _count(bigger, 100) > 60_000  # one more unit would not fit


def test_num_params_lands_within_one_percent_at_paper_scale():
    cfg = model_config(num_params="24M", mogrify_rank=84, cap_input_gate=True)
    hidden, _ = resolve_sizes(cfg, 10_000)
    with torch.device("meta"):  # counted without allocating 24M floats
        total = count_parameters(build_model(cfg, 10_000))
    assert abs(total - 24e6) / 24e6 < 0.01
    assert total <= 24e6


def test_embedding_ratio_follows_the_solved_hidden_size():
    cfg = model_config(num_params="200k", embedding_ratio=0.25)
    hidden, embedding = resolve_sizes(cfg, 500)
    assert embedding == round(0.25 * hidden)
    model = build_model(cfg, 500)
    assert model.embedding.weight.shape == (500, embedding)
    assert model.projection.weight.shape == (embedding, hidden)  # before the tied softmax


def test_a_budget_below_the_smallest_model_is_an_error():
    with pytest.raises(ValueError, match=r"model.num_params='1k'.*too small"):
        resolve_sizes(model_config(num_params="1k"), 10_000)


def test_num_params_in_the_config_takes_text_or_numbers():
    for value in ("24M", "24e6", "24000000", "2.4e7"):
        cfg = load_config(None, [f"model.num_params={value}"])
        assert parse_count(cfg.model.num_params) == 24_000_000
    from moglstm.lm.config import from_dict

    assert from_dict({"model": {"num_params": 24000000}}).model.num_params == "24000000"
    with pytest.raises(ValueError, match="model.num_params.*'lots'"):
        load_config(None, ["model.num_params=lots"])
    with pytest.raises(ValueError, match="model.num_params.*recurrent"):
        load_config(None, ["model.kind=transformer", "model.num_params=1M"])


def test_a_run_records_the_sizes_its_budget_solved(
    word_corpus_dir, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    """config.yaml and the checkpoint say what was built; each message is printed once."""
    from moglstm.cli import main
    from moglstm.lm.runs.folder import load_run

    args = [
        "data.corpus=text",
        f"data.path={word_corpus_dir}",
        "data.batch_size=4",
        "data.bptt=8",
        "model.num_layers=1",
        "model.num_params=20k",
        "model.embedding_ratio=0.5",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.device=cpu",
    ]
    assert main(["train", "--out-dir", str(tmp_path), "--name", "budget", *args]) == 0
    err = capsys.readouterr().err
    run = tmp_path / "budget"
    loaded = load_run(run, "last", "cpu")
    built = loaded.model
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["hidden_size"] == built.hidden_size != 256  # not the default it started from
    assert built.embedding.weight.shape[1] == round(0.5 * built.hidden_size)
    assert saved["num_params"] == "20k"  # the request is kept beside its answer
    assert loaded.config.model.hidden_size == built.hidden_size
    assert err.count(f"model.num_params=20k: hidden size {built.hidden_size}") == 1, err
    # the same command with --resume resumes (the budget asks for the recorded sizes)
    resumed = ["train", "--resume", "--out-dir", str(tmp_path), "--name", "budget"]
    assert main([*resumed, *args[:-3], "train.max_steps=4", "train.device=cpu"]) == 0
    assert "hidden size" not in capsys.readouterr().err  # confirmed, not searched again
    for command in (["evaluate", str(run)], ["generate", str(run), "--tokens", "3"]):
        assert main([*command, "--device", "cpu"]) == 0
        assert "hidden size" not in capsys.readouterr().err
