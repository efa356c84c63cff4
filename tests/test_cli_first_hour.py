"""The command line as a new user meets it: the quick start on the bundled corpus, overrides
anywhere, defaults in every help, errors in the user's words, progress and unknown words."""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from moglstm import cli
from tests.test_cli import run_cli, tiny_overrides, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(cli.__file__).resolve().parent.parent  # src/moglstm


@pytest.fixture
def runs(tmp_path) -> Path:
    return tmp_path / "runs"


# --------------------------------------------------------------------------- quick start


@pytest.mark.slow  # trains on the bundled corpus: 10-30 s
def test_quick_start_end_to_end_on_the_bundled_corpus(capsys, runs):
    """`moglstm train` with no preset (a few steps), then evaluate and generate from it."""
    code, out, err = run_cli(
        capsys, "train", "--out-dir", str(runs), "train.max_steps=4", "train.eval_max_tokens=300"
    )
    assert code == 0
    # the expected duration, measured on the first steps (the first one is not timed)
    assert re.search(r"about \S+ to go: 1 steps at [\d.]+ s/step", err), err
    run_dir = runs / "quickstart"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["corpus"] == "shakespeare" and config["train"]["max_steps"] == 4
    assert (run_dir / "best.pt").is_file() and "step: 4" in out
    code, out, _ = run_cli(
        capsys, "evaluate", str(run_dir), "--split", "test", "--max-tokens", "300", "--json"
    )
    assert code == 0 and 0 < json.loads(out)["ppl"] < 17_842 * 2
    code, out, _ = run_cli(
        capsys, "generate", str(run_dir), "--prompt", "ROMEO .", "--tokens", "8", "--seed", "1"
    )
    assert code == 0 and out.startswith("ROMEO .")


# --------------------------------------------------------------------------- overrides


def test_overrides_anywhere_among_the_options(capsys, runs, word_corpus_dir):
    first, *rest = tiny_overrides(word_corpus_dir)
    code, out, _ = run_cli(
        capsys, "train", first, "--name", "mine", *rest[:3], "--out-dir", str(runs),
        *rest[3:], "--quiet", "train.max_steps=3", "--json",
    )  # fmt: skip
    assert code == 0
    assert json.loads(out)["step"] == 3
    config = yaml.safe_load((runs / "mine" / "config.yaml").read_text())
    assert config["data"]["path"] == str(word_corpus_dir)


def test_the_issue_command_line_runs(capsys, runs, word_corpus_dir, monkeypatch):
    monkeypatch.chdir(runs.parent)
    code, _, _ = run_cli(
        capsys, "train", "data.corpus=text", f"data.path={word_corpus_dir}", "--name", "mine",
        "train.max_steps=3", "--quiet", "data.batch_size=4", "train.eval_max_tokens=100",
    )  # fmt: skip
    assert code == 0 and (runs.parent / "runs" / "mine" / "last.pt").is_file()


def test_without_a_preset_the_base_is_the_quick_start_unless_a_corpus_is_chosen(capsys):
    code, out, _ = run_cli(capsys, "train", "model.hidden_size=128", "--print-config")
    assert code == 0
    quick = yaml.safe_load(out)
    assert quick["name"] == "quickstart" and quick["data"]["corpus"] == "shakespeare"
    assert quick["model"]["hidden_size"] == 128 and quick["model"]["input_dropout"] == 0.3
    code, out, _ = run_cli(capsys, "train", "data.corpus=text", "data.path=x", "--print-config")
    assert code == 0
    own = yaml.safe_load(out)
    assert own["name"] == "run" and own["model"]["input_dropout"] == 0.0  # the defaults


def test_a_config_key_written_as_an_option_gets_a_hint(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--train.max_steps", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --train.max_steps" in err and "KEY=VALUE" in err


# --------------------------------------------------------------------------- help


def subcommand_parsers() -> dict:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return dict(sub.choices)


@pytest.mark.parametrize(
    "command", ["train", "evaluate", "generate", "presets", "benchmark", "report", "tune"]
)
def test_every_option_help_shows_its_default(command, capsys):
    parser = subcommand_parsers()[command]
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"]
    for action in options:
        assert "default" in formatter._get_help_string(action), action.option_strings
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    assert text.count("default") >= len(options)


def test_generate_help_shows_the_defaults_a_user_asked_for(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("(default: 50)", "(default: 1.0)", "(default: 0)", "(default: best)"):
        assert fragment in text


# --------------------------------------------------------------------------- errors


def test_rank_is_checked_against_the_hidden_size_before_any_data(capsys, runs):
    code, _, err = run_cli(
        capsys, "train", "--preset", "ptb-small", "model.mogrify_rank=500", "--print-config"
    )
    assert code == 2
    assert "model.mogrifier.rank=500 must be below model.hidden_size=200" in err
    assert not runs.exists()


def test_a_failed_start_leaves_no_run_folder(capsys, runs, tmp_path):
    code, _, err = run_cli(
        capsys, "train", "--out-dir", str(runs), "--name", "nf", "data.corpus=text",
        f"data.path={tmp_path / 'nowhere'}",
    )  # fmt: skip
    assert code == 2 and "does not exist" in err
    assert not (runs / "nf").exists()


def test_errors_name_config_keys_not_python_attributes():
    """No message in the package spells a config key as a Python attribute."""
    pattern = re.compile(r"\b(Data|Model|Train|Run)Config\.[a-z_]+")
    offenders = []
    for path in [*SRC.glob("*.py"), *SRC.glob("cli/*.py"), *SRC.glob("lm/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            logged = isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                "warning",
                "error",
            )
            if isinstance(node, ast.Raise) or logged:
                for const in ast.walk(node):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        if pattern.search(const.value):
                            offenders.append(f"{path.name}:{node.lineno}: {const.value}")
    assert not offenders, offenders


def test_missing_named_corpus_names_the_config_key(capsys, runs):
    code, _, err = run_cli(
        capsys, "train", "--preset", "ptb-small", "--out-dir", str(runs), "--quiet"
    )
    assert code == 2
    assert "data.data_dir" in err and "DataConfig" not in err
    assert "data.corpus=shakespeare" in err  # the way out that needs no download
    assert not (runs / "ptb-small").exists()


# --------------------------------------------------------------------------- generate


def test_generate_names_unknown_words_and_never_writes_unk(capsys, runs, word_corpus_dir):
    train_tiny(capsys, runs, word_corpus_dir, "g")
    code, out, err = run_cli(
        capsys, "generate", str(runs / "g"), "--prompt", "The zebra sees 12", "--greedy",
        "--tokens", "30", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["unknown_words"] == [["The", "the"], ["zebra", None], ["12", None]]
    assert "3 prompt word(s) unknown to the model, read as <unk>: 'The' (try 'the')" in err
    assert "<unk>" not in result["tokens"]
    code, out, _ = run_cli(
        capsys, "generate", str(runs / "g"), "--prompt", "zebra zebra zebra", "--greedy",
        "--tokens", "5", "--allow-unk", "--json",
    )  # fmt: skip
    assert code == 0  # allowed: a model fed only <unk> may now write it (it need not)


def test_unknown_words_suggest_ptb_spellings():
    from moglstm.lm.data import Vocab
    from moglstm.lm.generate import unknown_words

    vocab = Vocab.from_tokens("the company said N shares <unk>".split())
    assert unknown_words(vocab, ["The", "Company", "12.5", "zebra", "The"]) == [
        ["The", "the"],
        ["Company", "company"],
        ["12.5", "N"],
        ["zebra", None],
    ]


# --------------------------------------------------------------------------- evaluate


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("dynamic", [False, True])
def test_evaluate_shows_progress_unless_quiet(dynamic, capsys, runs, word_corpus_dir, monkeypatch):
    import functools

    from moglstm.lm import progress

    train_tiny(capsys, runs, word_corpus_dir, "e")
    extra = ["--dynamic", "--dynamic-grad-batches", "2"] if dynamic else []
    redraw_every_update = functools.partial(progress.tqdm, mininterval=0, miniters=1)
    for quiet in (False, True):
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        monkeypatch.setattr(progress, "tqdm", redraw_every_update)  # a tiny split is fast
        code = cli.main(["evaluate", str(runs / "e"), *extra, *(["--quiet"] if quiet else [])])
        monkeypatch.undo()
        assert code == 0
        shown = terminal.getvalue()
        if quiet:
            assert "tok/s" not in shown and "ppl=" not in shown
        else:
            assert "tok/s" in shown and "ppl=" in shown, shown
            assert ("dynamic valid" if dynamic else "valid") in shown
            assert ("gradient RMS on train" in shown) == dynamic


def test_evaluate_bad_values_name_the_flags(capsys, runs):
    for option, value in (("--batch-size", "0"), ("--bptt", "-1"), ("--max-tokens", "x")):
        with pytest.raises(SystemExit):
            cli.main(["evaluate", str(runs), option, value])
        assert f"argument {option}:" in capsys.readouterr().err


def test_benchmark_device_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["benchmark", "--device", "cuda"]) == 2
    assert "error: --device cuda: no CUDA device is available" in capsys.readouterr().err
