"""Tests for moglstm.lm.evaluate: scoring a split, loading runs, devices and metrics."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from moglstm.lm.config import RunConfig, TrainConfig, model_config
from moglstm.lm.data import batchify, load_corpus
from moglstm.lm.evaluate import evaluate, evaluate_loss
from moglstm.lm.metrics import metric_name, metrics_for
from moglstm.lm.runs.folder import load_run, resolve_checkpoint
from moglstm.lm.runtime import resolve_device
from moglstm.lm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(data_config, out_dir: Path, kind: str = "mogrifier", steps: int = 4) -> Path:
    """Train a tiny model for a few steps; return its run folder."""
    model = model_config(kind=kind, hidden_size=16, num_layers=2, mogrify_rounds=2)
    if kind == "transformer":
        model = model_config(kind=kind, d_model=16, heads=2, depth=1, max_len=16)
    cfg = RunConfig(
        name=kind,
        out_dir=str(out_dir),
        data=data_config,
        model=model,
        train=TrainConfig(lr=0.01, max_steps=steps, eval_every=2, device="cpu"),
    )
    train(cfg, quiet=True)
    return out_dir / kind


@pytest.fixture
def word_run(word_data_config, tmp_path) -> Path:
    return train_tiny(word_data_config, tmp_path)


def hand_computed_loss(run_dir: Path, split: str) -> tuple[float, int]:
    """Mean cross-entropy of the whole split read as one window from a zero state."""
    loaded = load_run(run_dir)
    ids = load_corpus(loaded.config.data, vocab=loaded.vocab).split(split)
    with torch.no_grad():
        logits, _ = loaded.model(ids[:-1].unsqueeze(1), None)  # (L-1, 1, V)
    log_probs = torch.log_softmax(logits[:, 0].double(), dim=-1)
    picked = log_probs.gather(1, ids[1:].unsqueeze(1))  # log p(token t+1 | tokens <= t)
    return -picked.mean().item(), ids.numel()


def test_batch_size_one_equals_hand_computed_loss(word_run):
    expected, length = hand_computed_loss(word_run, "test")
    results = evaluate(word_run, "test", batch_size=1, bptt=7, device="cpu")
    assert math.isclose(results["loss"], expected, rel_tol=1e-5)
    assert math.isclose(results["ppl"], math.exp(expected), rel_tol=1e-5)
    assert results["tokens"] == length - 1  # every token but the first is scored
    assert results["tokens_dropped"] == 0
    assert results["batch_size"] == 1
    assert results["step"] == 4
    assert results["level"] == "word"


def test_larger_batches_report_the_unscored_tokens(word_run):
    length = hand_computed_loss(word_run, "valid")[1]
    results = evaluate(word_run, "valid", batch_size=3, device="cpu")
    assert results["tokens"] == (length // 3 - 1) * 3
    assert results["tokens_dropped"] == 3 - 1 + length % 3
    assert results["tokens"] + results["tokens_dropped"] == length - 1


def test_default_batch_size_is_the_runs(word_run, word_data_config):
    results = evaluate(word_run, "valid", device="cpu")
    assert results["batch_size"] == word_data_config.eval_batch_size
    assert results["checkpoint"] == str(word_run / "best.pt")


def test_recurrent_loss_does_not_depend_on_the_window(word_run):
    loaded = load_run(word_run)
    ids = load_corpus(loaded.config.data, vocab=loaded.vocab).valid
    data = batchify(ids, 2)
    short, n_short = evaluate_loss(loaded.model, data, 3)
    long, n_long = evaluate_loss(loaded.model, data, 50)
    assert n_short == n_long == (data.size(0) - 1) * 2
    assert math.isclose(short, long, rel_tol=1e-5)


def test_max_tokens_limits_scoring(word_run):
    results = evaluate(word_run, "valid", batch_size=2, max_tokens=40, device="cpu")
    assert results["tokens"] == 40
    assert results["tokens_dropped"] is None


def test_transformer_windows_are_scored_from_scratch(word_data_config, tmp_path):
    run_dir = train_tiny(word_data_config, tmp_path, kind="transformer", steps=2)
    loaded = load_run(run_dir)
    ids = load_corpus(loaded.config.data, vocab=loaded.vocab).valid
    data = batchify(ids, 1)
    loss, count = evaluate_loss(loaded.model, data, 100)  # clipped to max_len = 16
    total = 0.0
    with torch.no_grad():
        for start in range(0, data.size(0) - 1, 16):
            window = data[start : start + 17]
            logits, state = loaded.model(window[:-1], None)
            assert state is None
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).double(),
                window[1:].reshape(-1),
                reduction="sum",
            ).item()
    assert count == data.size(0) - 1
    assert math.isclose(loss, total / count, rel_tol=1e-5)


def test_char_level_reports_bits_per_character(char_data_config, tmp_path):
    run_dir = train_tiny(char_data_config, tmp_path, steps=2)
    results = evaluate(run_dir, "test", device="cpu")
    assert results["level"] == "char"
    assert "ppl" not in results
    assert math.isclose(results["bpc"], results["loss"] / math.log(2))


def test_checkpoint_choice_and_paths(word_run):
    assert resolve_checkpoint(word_run) == word_run / "best.pt"
    assert resolve_checkpoint(word_run, "last") == word_run / "last.pt"
    assert resolve_checkpoint(word_run / "last.pt", "best") == word_run / "last.pt"
    from_file = evaluate(word_run / "last.pt", "valid", device="cpu")
    from_folder = evaluate(word_run, "valid", checkpoint="last", device="cpu")
    assert from_file["loss"] == from_folder["loss"]
    with pytest.raises(ValueError, match="checkpoint='first'"):
        resolve_checkpoint(word_run, "first")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(word_run / "missing")
    (word_run / "best.pt").unlink()
    (word_run / "best.prev.pt").unlink(missing_ok=True)  # else it stands in for best.pt
    with pytest.raises(FileNotFoundError, match="has no best.pt"):
        resolve_checkpoint(word_run)


def test_load_run_rebuilds_the_trained_model(word_run):
    loaded = load_run(word_run, "last")
    payload = torch.load(word_run / "last.pt", weights_only=True)
    assert not loaded.model.training
    assert loaded.step == 4
    assert loaded.vocab.to_dict() == payload["vocab"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, payload["model"][key])


def test_bad_arguments_are_clear_errors(word_run):
    with pytest.raises(ValueError, match="split='dev'"):
        evaluate(word_run, "dev")
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(word_run, batch_size=0)
    with pytest.raises(TypeError, match="bptt"):
        evaluate(word_run, bptt=2.5)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")


def test_metrics_for_levels():
    assert metric_name("word") == "ppl"
    assert metric_name("char") == metric_name("byte") == "bpc"
    assert metrics_for(math.log(100), "word") == pytest.approx({"loss": math.log(100), "ppl": 100})
    assert metrics_for(math.log(2), "char") == pytest.approx({"loss": math.log(2), "bpc": 1.0})
    assert metrics_for(1e4, "word")["ppl"] == math.inf


def test_named_corpus_run_evaluates_from_its_data_dir(tiny_named_data_dir, tmp_path):
    from moglstm.lm.config import DataConfig

    data = DataConfig(
        corpus="ptb", data_dir=str(tiny_named_data_dir), batch_size=4, bptt=8, eval_batch_size=2
    )
    run_dir = train_tiny(data, tmp_path, steps=2)
    moved = tmp_path / "moved"
    tiny_named_data_dir.rename(moved)
    with pytest.raises(ValueError, match="missing ptb file"):
        evaluate(run_dir, "valid", device="cpu")
    results = evaluate(run_dir, "valid", device="cpu", data_dir=str(moved))
    assert results["tokens"] > 0
    assert dataclasses.asdict(load_run(run_dir).config.data)["corpus"] == "ptb"
