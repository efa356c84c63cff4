"""Config versions: runs written before versioning (fixtures/v1) load, evaluate and resume.

The fixtures were written by the release before config versioning (see fixtures/v1/README.md)
and are never regenerated: they stand for the runs users already have.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from moglstm.lm.config import (
    CONFIG_VERSION,
    MOVED_MODEL_KEYS,
    RunConfig,
    apply_overrides,
    current_key,
    from_dict,
    load_config,
    read_config,
    to_dict,
    to_yaml,
    upgrade,
    validate,
)
from moglstm.lm.errors import ConfigError
from moglstm.lm.evaluate import evaluate
from moglstm.lm.report import read_run
from moglstm.lm.runs.checkpoint import load_checkpoint
from moglstm.lm.runs.folder import load_run, resume_config
from moglstm.lm.runs.payload import check_training_checkpoint
from moglstm.lm.train import train

V1 = Path(__file__).parent / "fixtures" / "v1"


@pytest.fixture
def v1_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the version-1 run folder, with its corpus where its config says (relative)."""
    shutil.copytree(V1 / "corpus", tmp_path / "corpus")
    shutil.copytree(V1 / "mogrifier-run", tmp_path / "runs" / "v1run")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "runs" / "v1run"


def test_version_1_config_yaml_reads_as_the_current_version():
    raw = yaml.safe_load((V1 / "mogrifier-run" / "config.yaml").read_text())
    assert "version" not in raw and "mogrify_rounds" in raw["model"]  # really version 1
    cfg = validate(read_config(V1 / "mogrifier-run" / "config.yaml"))
    assert cfg.version == CONFIG_VERSION
    m = cfg.model
    assert (m.mogrifier.rounds, m.mogrifier.rank, m.embedding_size) == (2, 2, 3)
    assert m.output.tie_weights and m.transformer.d_model == 256
    tf = validate(read_config(V1 / "transformer-config.yaml")).model
    assert tf.kind == "transformer"
    assert (tf.transformer.d_model, tf.transformer.heads, tf.transformer.ffn_size) == (4, 2, 4)
    assert tf.transformer.dropout == 0.0 and tf.transformer.max_len == 8


def test_version_1_checkpoint_loads_and_evaluates(v1_run: Path):
    payload = load_checkpoint(v1_run / "last.pt")
    assert "version" not in payload["config"]
    cfg = check_training_checkpoint(payload, v1_run / "last.pt", resume=True)
    assert cfg.version == CONFIG_VERSION and cfg.model.mogrifier.rank == 2
    loaded = load_run(v1_run, "last")
    logits, _ = loaded.model(torch.zeros(3, 2, dtype=torch.long))
    assert logits.shape == (3, 2, len(loaded.vocab)) and torch.isfinite(logits).all()
    result = evaluate(v1_run, "valid", checkpoint="last", device="cpu")
    assert result["loss"] > 0


def test_reports_compare_version_1_runs_by_the_current_key_names(v1_run: Path):
    record = read_run(v1_run)
    assert record.config["model.mogrifier.rounds"] == 2
    assert "model.mogrify_rounds" not in record.config
    assert record.params is not None  # counted from its (upgraded) checkpoint


def test_version_1_run_resumes_with_old_key_names(v1_run: Path):
    # the run's original command line repeats old names; the new step count may change
    overrides = ["model.mogrify_rounds=2", "model.mogrify_rank=2", "train.max_steps=4"]
    cfg = resume_config(v1_run, overrides)
    assert cfg.train.max_steps == 4 and cfg.model.mogrifier.rounds == 2
    with pytest.raises(ValueError, match="model.mogrifier.rounds cannot change"):
        resume_config(v1_run, ["model.mogrify_rounds=3"])
    results = train(cfg, resume=True, quiet=True)
    assert results["step"] == 4
    saved = yaml.safe_load((v1_run / "config.yaml").read_text())
    assert saved["version"] == CONFIG_VERSION and saved["model"]["mogrifier"]["rounds"] == 2
    assert load_checkpoint(v1_run / "last.pt")["config"]["version"] == CONFIG_VERSION


def test_every_old_model_key_reaches_its_new_place():
    old = {"model": {key: None for key in MOVED_MODEL_KEYS}}
    new = upgrade(old)["model"]
    for key, path in MOVED_MODEL_KEYS.items():
        section, leaf = path.split(".")
        assert leaf in new[section] and key not in new
        assert current_key(f"model.{key}") == f"model.{path}"
    assert current_key("model.hidden_size") == "model.hidden_size"


def test_old_names_work_in_overrides_sections_and_presets(tmp_path: Path):
    cfg = apply_overrides(RunConfig(), ["model.mogrify_rounds=3", "model.d_model=64"])
    assert cfg.model.mogrifier.rounds == 3 and cfg.model.transformer.d_model == 64
    cfg = apply_overrides(RunConfig(), ["model={mogrify_rank: 8, mogrifier: {rounds: 4}}"])
    assert (cfg.model.mogrifier.rank, cfg.model.mogrifier.rounds) == (8, 4)
    assert cfg.model.mogrifier.implementation == "auto"  # the keys not given are kept
    old_preset = tmp_path / "old.yaml"
    old_preset.write_text("model:\n  mogrify_rounds: 1\n  tie_weights: false\n")
    cfg = load_config(old_preset)
    assert cfg.model.mogrifier.rounds == 1 and not cfg.model.output.tie_weights


def test_version_errors_name_the_problem():
    with pytest.raises(ConfigError, match="newer moglstm"):
        from_dict({"version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="mogrify_rounds=3 .* and model.mogrifier.rounds=4"):
        from_dict({"model": {"mogrify_rounds": 3, "mogrifier": {"rounds": 4}}})
    assert from_dict({"model": {"mogrify_rounds": 4, "mogrifier": {"rounds": 4}}})
    with pytest.raises(ConfigError, match="version"):
        validate(RunConfig(version=1))


def test_saved_configs_carry_their_version():
    assert to_dict(RunConfig())["version"] == CONFIG_VERSION
    assert to_yaml(RunConfig()).startswith(f"version: {CONFIG_VERSION}\n")
