"""The texts a newcomer meets are right: examples that work, suggestions that exist."""

from __future__ import annotations

import pytest

from moglstm.lm.config import RunConfig, apply_overrides
from moglstm.lm.train import train
from tests.lm.test_train import make_cfg
from tests.test_cli import run_cli


@pytest.mark.parametrize(
    "item, meant",
    [
        ("hidden_size=100", "model.hidden_size"),
        ("bptt=35", "data.bptt"),
        ("max_step=30", "train.max_steps"),
        ("rounds=3", "model.mogrifier.rounds"),
        ("model.rounds=3", "model.mogrifier.rounds"),
    ],
)
def test_a_key_given_without_its_section_gets_the_full_key_suggested(item, meant):
    with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
        apply_overrides(RunConfig(), [item])


def test_the_malformed_override_example_is_itself_a_valid_override():
    with pytest.raises(ValueError, match="e.g. ") as info:
        apply_overrides(RunConfig(), ["=35"])
    example = str(info.value).rsplit("e.g. ", 1)[1]
    assert apply_overrides(RunConfig(), [example]).data.bptt == 35


def test_rerunning_a_run_says_how_to_go_on_in_command_line_words(word_data_config, tmp_path):
    cfg = make_cfg(word_data_config, tmp_path, max_steps=2, eval_every=2)
    train(cfg, quiet=True)
    with pytest.raises(FileExistsError) as info:
        train(cfg, quiet=True)
    message = str(info.value)
    assert f"moglstm train --resume {tmp_path / 'run'}" in message
    assert "train.max_steps" in message and "--name" in message
    assert "resume=True" not in message


def test_presets_call_the_lstm_baselines_lstm(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    for name in ("ptb-paper-lstm", "wt2-paper-lstm", "enwik8-paper-lstm", "ptb-char-paper-lstm"):
        assert ", lstm " in lines[name] and "mogrifier" not in lines[name].split("[")[1], name
    assert ", mogrifier " in lines["ptb-paper"]
