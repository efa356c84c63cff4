"""Tests for the ``moglstm`` command line (in-process through ``cli.main``, plus one subprocess)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from moglstm import cli
from moglstm.lm.config import list_presets
from tests import processes

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_overrides(corpus: Path, steps: int = 4) -> list[str]:
    return [
        "data.corpus=text",
        f"data.path={corpus}",
        "data.batch_size=4",
        "data.bptt=8",
        "data.eval_batch_size=2",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.mogrify_rounds=2",
        f"train.max_steps={steps}",
        "train.eval_every=2",
        "train.log_every=1",
        "train.lr=0.01",
        "train.device=cpu",
    ]


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_tiny(capsys, runs: Path, corpus: Path, name: str = "tiny", *extra: str) -> str:
    code, out, err = run_cli(
        capsys,
        "train",
        "--out-dir",
        str(runs),
        "--name",
        name,
        "--quiet",
        *tiny_overrides(corpus),
        *extra,
    )
    assert code == 0, err
    return out


def assert_one_line_error(err: str, command: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moglstm {command}: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in err


# --------------------------------------------------------------------------- end to end


def test_train_evaluate_generate(capsys, runs, word_corpus_dir):
    out = train_tiny(capsys, runs, word_corpus_dir)
    assert "step: 4" in out and "valid_ppl:" in out
    run_dir = runs / "tiny"
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()

    code, out, _ = run_cli(
        capsys, "evaluate", str(run_dir), "--split", "test", "--batch-size", "1", "--json"
    )
    assert code == 0
    results = json.loads(out)
    assert results["split"] == "test" and results["tokens_dropped"] == 0
    assert results["ppl"] > 1

    code, out, _ = run_cli(capsys, "evaluate", str(run_dir / "last.pt"), "--device", "cpu")
    assert code == 0
    assert "loss:" in out and "ppl:" in out and "tokens_dropped:" in out

    code, out, _ = run_cli(
        capsys, "generate", str(run_dir), "--prompt", "the cat", "--tokens", "6", "--seed", "0"
    )
    assert code == 0
    text = out.strip()
    assert text.startswith("the cat")
    assert len(text.split()) >= 2 + 1  # the prompt plus generated words (lines may break)

    code, out, _ = run_cli(
        capsys, "generate", str(run_dir), "--prompt", "the", "--tokens", "4", "--greedy", "--json"
    )
    assert code == 0
    assert len(json.loads(out)["tokens"]) == 4


def test_progress_messages_go_to_stderr(capsys, runs, word_corpus_dir):
    code, out, err = run_cli(
        capsys, "train", "--out-dir", str(runs), "--name", "loud", *tiny_overrides(word_corpus_dir)
    )
    assert code == 0
    assert "starting in" in err and "valid loss" in err
    assert "valid_ppl:" in out


def test_train_json_output(capsys, runs, word_corpus_dir):
    out = train_tiny(capsys, runs, word_corpus_dir, "js", "--json")
    results = json.loads(out)
    assert results["step"] == 4 and results["stopped"] == "max_steps"


def test_resume_from_the_command_line(capsys, runs, word_corpus_dir):
    train_tiny(capsys, runs, word_corpus_dir, "r")
    # `--resume KEY=VALUE`: the override must not be taken for a run folder
    code, out, err = run_cli(
        capsys,
        "train",
        "--out-dir",
        str(runs),
        "--name",
        "r",
        "--resume",
        "train.max_steps=6",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out)["step"] == 6
    code, out, err = run_cli(
        capsys, "train", "--resume", str(runs / "r"), "train.max_steps=8", "--json", "--quiet"
    )
    assert code == 0, err
    assert json.loads(out)["step"] == 8
    records = [json.loads(x) for x in (runs / "r" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys))
    assert yaml.safe_load((runs / "r" / "config.yaml").read_text())["train"]["max_steps"] == 8


def test_resume_cannot_change_the_model(capsys, runs, word_corpus_dir):
    train_tiny(capsys, runs, word_corpus_dir, "r")
    code, _, err = run_cli(
        capsys, "train", "--resume", str(runs / "r"), "model.hidden_size=32", "--quiet"
    )
    assert code == 2
    assert_one_line_error(err, "train", "model.hidden_size cannot change when resuming")


def test_resume_needs_a_run(capsys, runs):
    code, _, err = run_cli(capsys, "train", "--out-dir", str(runs), "--name", "none", "--resume")
    assert code == 2
    assert_one_line_error(err, "train", "nothing to resume")


def test_existing_run_folder_is_not_overwritten(capsys, runs, word_corpus_dir):
    train_tiny(capsys, runs, word_corpus_dir, "taken")
    before = (runs / "taken" / "last.pt").read_bytes()
    code, _, err = run_cli(
        capsys, "train", "--out-dir", str(runs), "--name", "taken", *tiny_overrides(word_corpus_dir)
    )
    assert code == 2
    assert_one_line_error(err, "train", "--resume")
    assert (runs / "taken" / "last.pt").read_bytes() == before


# --------------------------------------------------------------------------- errors


def test_bad_config_is_one_line_and_exit_2(capsys, runs):
    code, out, err = run_cli(
        capsys, "train", "--out-dir", str(runs), "model.hidden_sise=3", "train.lr=-1"
    )
    assert code == 2
    assert_one_line_error(err, "train", "unknown config key 'model.hidden_sise'")
    assert "did you mean 'model.hidden_size'" in err
    assert not runs.exists()


def test_several_config_problems_on_one_line(capsys, runs):
    code, _, err = run_cli(capsys, "train", "--out-dir", str(runs), "train.lr=-1", "data.bptt=0")
    assert code == 2
    assert_one_line_error(err, "train", "invalid config:")
    assert "train.lr=-1.0 must be positive" in err and "data.bptt=0 must be positive" in err


def test_debug_shows_the_traceback(runs):
    with pytest.raises(ValueError, match="hidden_sise"):
        cli.main(["train", "--debug", "--out-dir", str(runs), "model.hidden_sise=3"])


def test_evaluate_and_generate_errors(capsys, runs, word_corpus_dir):
    code, _, err = run_cli(capsys, "evaluate", str(runs / "missing"))
    assert code == 2
    assert_one_line_error(err, "evaluate", "not found")
    train_tiny(capsys, runs, word_corpus_dir, "g")
    for option, value, fragment in (
        ("--temperature", "-1", "argument --temperature: must be in [0, inf], got -1"),
        ("--temperature", "nan", "argument --temperature: must be in"),
        ("--top-p", "0", "argument --top-p: must be in (0, 1], got 0"),
        ("--top-p", "1.5", "argument --top-p: must be in (0, 1], got 1.5"),
        ("--top-k", "-2", "argument --top-k: must be >= 0, got -2"),
        ("--tokens", "0", "argument --tokens: must be >= 1, got 0"),
        ("--tokens", "many", "argument --tokens: expected an integer, got 'many'"),
    ):
        with pytest.raises(SystemExit) as excinfo:  # argparse: the usage, then the error
            cli.main(["generate", str(runs / "g"), option, value])
        assert excinfo.value.code == 2, option
        err = capsys.readouterr().err
        assert err.startswith("usage: moglstm generate") and fragment in err, err
        assert "Traceback" not in err


def test_divergence_exits_1_with_one_line(capsys, runs, word_corpus_dir):
    code, _, err = run_cli(
        capsys,
        "train",
        "--out-dir",
        str(runs),
        "--quiet",
        *tiny_overrides(word_corpus_dir),
        "train.lr=1e37",
        "train.clip=0",
    )
    assert code == 1
    assert err.strip().startswith("moglstm train: failed: non-finite training loss")
    assert len(err.strip().splitlines()) == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["evaluate", "run", "--split", "dev"])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["train", "--nmae", "x"])
    assert excinfo.value.code == 2
    assert "usage: moglstm train" in capsys.readouterr().err  # the subcommand's usage


def test_bare_moglstm_lists_the_commands(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 0
    for command in ("train", "evaluate", "generate", "presets", "benchmark"):
        assert f"    {command}" in out
    assert "moglstm train " in out  # the examples


# --------------------------------------------------------------------------- presets, help


def test_presets_lists_every_preset_with_a_description(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    ptb_small = next(line for line in lines if line.startswith("ptb-small "))
    assert "Mogrifier LSTM on Penn Treebank" in ptb_small
    assert "[ptb, mogrifier 2x200, 4000 steps]" in ptb_small


def test_presets_shows_one_preset_in_full(capsys):
    code, out, _ = run_cli(capsys, "presets", "ptb-small")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["name"] == "ptb-small"
    assert shown["model"]["hidden_size"] == 200
    code, _, err = run_cli(capsys, "presets", "nope")
    assert code == 2
    assert_one_line_error(err, "presets", "unknown preset 'nope'")


def test_print_config_resolves_preset_and_overrides(capsys, runs):
    code, out, _ = run_cli(
        capsys, "train", "--preset", "ptb-small", "--name", "x", "model.hidden_size=300",
        "--print-config",
    )  # fmt: skip
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["name"] == "x"
    assert shown["model"]["hidden_size"] == 300
    assert shown["train"]["max_steps"] == 4000
    assert not Path("runs/x").exists()


def test_subcommand_help_has_examples(capsys):
    for command in ("train", "evaluate", "generate", "presets"):
        with pytest.raises(SystemExit) as excinfo:
            cli.main([command, "--help"])
        assert excinfo.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"moglstm {command}" in out


def test_python_dash_m_help():
    result = processes.run(
        [sys.executable, "-m", "moglstm", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for word in ("train", "evaluate", "generate", "presets", "examples:"):
        assert word in result.stdout
