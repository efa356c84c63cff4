"""Regularisers of the paper's recipe: each does what it should, alone and in training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from moglstm.lm import train as train_module
from moglstm.lm.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    TransformerSettings,
    model_config,
)
from moglstm.lm.layers import LockedDropout
from moglstm.lm.models import RNNLanguageModel, TransformerLanguageModel
from moglstm.lm.regularize import (
    WeightAverager,
    drop_state,
    l2_penalty,
    scaled_dropout,
)
from moglstm.lm.runs.checkpoint import load_checkpoint
from moglstm.lm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(data: DataConfig, out_dir: Path, name: str = "run", **train_kw: Any) -> RunConfig:
    model = model_config(hidden_size=12, num_layers=2, mogrify_rounds=1, implementation="reference")
    settings = dict(lr=0.01, max_steps=8, eval_every=4, log_every=4, seed=5, device="cpu")
    settings.update(eval_max_tokens=100, **train_kw)
    return RunConfig(
        name=name, out_dir=str(out_dir), data=data, model=model, train=TrainConfig(**settings)
    )


def valid_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "valid"]


# --------------------------------------------------------------------------- L2


def test_l2_penalty_is_the_coefficient_times_the_sum_of_squares():
    torch.manual_seed(0)
    model = RNNLanguageModel(11, model_config(kind="lstm", hidden_size=6, embedding_size=6))  # tied
    expected = sum(p.detach().double().square().sum() for p in set(model.parameters()))
    penalty = l2_penalty(model, 0.25)
    assert torch.isclose(penalty.double(), 0.25 * expected, rtol=1e-5)
    # the tied embedding is counted once, not once per use
    assert model.decoder.weight is model.embedding.weight
    penalty.backward()
    for p in model.parameters():  # d/dp c * p^2 = 2 c p
        assert torch.allclose(p.grad, 0.5 * p.detach(), atol=1e-6)
    assert l2_penalty(model, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="coefficient"):
        l2_penalty(model, -1.0)


def test_l2_in_training_shrinks_the_weights(word_data_config, tmp_path):
    plain = train(tiny_run(word_data_config, tmp_path, "plain"), quiet=True)
    l2 = train(tiny_run(word_data_config, tmp_path, "l2", l2=0.05), quiet=True)

    def norm(result: dict) -> float:
        weights = load_checkpoint(Path(result["run_dir"]) / "last.pt")["model"]
        return sum(w.double().square().sum().item() for w in weights.values())

    assert norm(l2) < 0.95 * norm(plain)
    # the logged loss is the data loss alone, comparable across l2 settings
    assert abs(l2["train_loss"] - plain["train_loss"]) < 0.5


# --------------------------------------------------------------------------- drop_state


def test_drop_state_zeroes_streams_at_the_requested_rate():
    batch = 4000
    state = [(torch.ones(1, batch, 3), torch.ones(1, batch, 3)) for _ in range(2)]
    dropped = drop_state(state, 0.3, generator=torch.Generator().manual_seed(0))
    zeroed = dropped[0][0][0, :, 0] == 0  # (B,)
    assert abs(zeroed.float().mean().item() - 0.3) < 0.03
    for h, c in dropped:  # a stream is zeroed in every layer, h and c alike
        assert torch.equal(h[0, :, 0] == 0, zeroed) and torch.equal(c[0, :, 0] == 0, zeroed)
        assert torch.all((h == 0) | (h == 1))  # kept streams are untouched, not rescaled
    assert drop_state(None, 0.5) is None
    assert drop_state(state, 0.0) is state
    with pytest.raises(ValueError, match="p must be in"):
        drop_state(state, 1.0)


def test_training_drops_the_carried_state_before_each_batch(
    word_data_config, tmp_path, monkeypatch
):
    seen = []
    original = train_module.drop_state

    def spy(state, p):
        seen.append((state is None, p))
        return original(state, p)

    monkeypatch.setattr(train_module, "drop_state", spy)
    cfg = tiny_run(word_data_config, tmp_path)
    cfg.model.drop_state_probability = 0.25
    train(cfg, quiet=True)
    assert len(seen) == 8 and all(p == 0.25 for _, p in seen)
    assert seen[0][0] and not any(none for none, _ in seen[1:])  # carried from step 2 on


# --------------------------------------------------------------------------- weight averaging


def test_averaged_weights_are_the_mean_of_the_snapshots():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    avg = WeightAverager(model)
    avg.update()  # before start: nothing
    assert not avg.active
    snapshots = []
    avg.start()
    snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    mean = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in raw}
    averaged = avg.averaged_state_dict()
    for k in raw:
        assert torch.allclose(averaged[k], mean[k], atol=1e-6)
    with avg.swapped_in():
        for k, v in model.state_dict().items():
            assert torch.allclose(v, mean[k], atol=1e-6)
    for k, v in model.state_dict().items():  # the raw weights are back
        assert torch.equal(v, raw[k])
    other = WeightAverager(model)
    other.restore(avg.count, averaged)
    assert other.count == 7
    assert all(torch.equal(other.average[k], avg.average[k]) for k in avg.average)


def test_averaging_from_a_step_saves_the_mean_of_the_weights_since(
    word_data_config, tmp_path, monkeypatch
):
    snapshots = []
    original = train_module._average_weights

    def record(run):
        original(run)
        if run.averager.active:
            snapshots.append({k: v.clone() for k, v in run.model.state_dict().items()})

    monkeypatch.setattr(train_module, "_average_weights", record)
    result = train(tiny_run(word_data_config, tmp_path, average_from_step=5), quiet=True)
    assert len(snapshots) == 4  # steps 5, 6, 7 and 8
    ckpt = load_checkpoint(Path(result["run_dir"]) / "last.pt")
    assert ckpt["averaging"] == {"count": 4}
    for k, v in ckpt["model"].items():  # what evaluate and generate load: the average
        assert torch.allclose(v, torch.stack([s[k] for s in snapshots]).mean(0), atol=1e-6)
    for k, v in ckpt["train_model"].items():  # training goes on from the raw weights
        assert torch.equal(v, snapshots[-1][k])
    records = valid_records(Path(result["run_dir"]))
    assert "averaged_steps" not in records[0] and records[1]["averaged_steps"] == 4


def test_averaging_starts_after_validations_stop_improving(word_data_config, tmp_path, monkeypatch):
    # every validation returns the same loss: the first improves, the others do not
    monkeypatch.setattr(train_module, "evaluate_loss", lambda *a, **k: (3.0, 10))
    cfg = tiny_run(
        word_data_config, tmp_path, max_steps=10, eval_every=2, average_after_bad_evals=2
    )
    result = train(cfg, quiet=True)
    records = valid_records(Path(result["run_dir"]))
    # validations at steps 2, 4, 6, 8, 10; the 2nd bad one (step 6, scored with the raw
    # weights) starts averaging with step 6's weights, so step 8 scores the mean of 6..8
    assert [r.get("averaged_steps") for r in records] == [None, None, None, 3, 5]
    assert load_checkpoint(Path(result["run_dir"]) / "last.pt")["averaging"] == {"count": 5}


def test_a_resumed_run_with_averaging_ends_exactly_like_an_uninterrupted_one(
    word_data_config, tmp_path
):
    straight = tiny_run(word_data_config, tmp_path, "straight", average_from_step=3)
    train(straight, quiet=True)
    cut = tiny_run(word_data_config, tmp_path, "cut", average_from_step=3, max_steps=4)
    train(cut, quiet=True)
    train(dataclasses.replace(cut, train=straight.train), resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["averaging"] == b["averaging"] == {"count": 6}
    for key in ("model", "train_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


# --------------------------------------------------------------------------- dropout scaling


def test_scaled_dropout_scales_every_rate_and_restores_them():
    model = RNNLanguageModel(
        11,
        model_config(
            hidden_size=8,
            mogrify_rounds=1,
            embedding_dropout=0.1,
            input_dropout=0.2,
            state_dropout=0.3,
            output_dropout=0.4,
            mos_components=2,
            mos_dropout=0.25,
        ),
    )
    with scaled_dropout(model, 2.0):
        assert model.embedding_dropout == pytest.approx(0.2)
        assert model.input_drop.p == pytest.approx(0.4)
        assert model.layers[0].state_dropout == pytest.approx(0.6)
        assert model.output_drop.p == pytest.approx(0.8)
        assert model.mos.drop.p == pytest.approx(0.5)
    assert (model.input_drop.p, model.layers[0].state_dropout) == (0.2, 0.3)
    with pytest.raises(ValueError, match="reach"):
        with scaled_dropout(model, 3.0):
            pass
    assert model.output_drop.p == 0.4
    settings = TransformerSettings(d_model=8, heads=2, depth=1, dropout=0.1)
    transformer = TransformerLanguageModel(11, settings)
    with scaled_dropout(transformer, 0.0):
        assert all(m.p == 0.0 for m in transformer.modules() if isinstance(m, nn.Dropout))
    assert isinstance(LockedDropout(0.1), nn.Module)
