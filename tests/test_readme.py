"""The README's examples run: every ```python block, the quick start's commands (with a few
steps), and every `moglstm` command line parses. Its install and test lines match CI, and it
speaks to a user, not about this project's own machines."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from moglstm import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
BASH = re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
QUICK_START = TEXT.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block: continuations joined, comments dropped, `&&` split."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


MOGLSTM_LINES = [words for block in BASH for words in commands(block) if words[0] == "moglstm"]


def test_readme_has_examples():
    assert len(BLOCKS) >= 3
    assert len(MOGLSTM_LINES) >= 15


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, tiny_named_data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOGLSTM_DATA", str(tiny_named_data_dir))
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("words", MOGLSTM_LINES, ids=lambda w: " ".join(w[1:3]))
def test_every_readme_command_line_parses(words, capsys):
    parser = cli.build_parser()
    args, extras = parser.parse_known_args(words[1:])  # SystemExit on an unknown option
    assert args.command is not None
    if extras:
        cli._take_overrides(args, extras)  # only KEY=VALUE items may be left over


@pytest.mark.slow  # trains on the bundled corpus: 10-30 s
def test_the_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's first command, with a few steps: install is done, train, then sample."""
    steps = commands(QUICK_START.split("```bash", 1)[1].split("```", 1)[0])
    assert [w[:2] for w in steps] == [
        ["pip", "install"],
        ["moglstm", "train"],
        ["moglstm", "generate"],
    ]
    monkeypatch.chdir(tmp_path)
    train = steps[1][1:] + ["--quiet", "train.max_steps=3", "train.eval_max_tokens=200"]
    assert cli.main(train) == 0
    config = yaml.safe_load((tmp_path / "runs" / "quickstart" / "config.yaml").read_text())
    assert config["data"]["corpus"] == "shakespeare"  # bundled: nothing was downloaded
    capsys.readouterr()
    assert cli.main(steps[2][1:] + ["--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO .") and len(out.split()) > 10


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_steps = [line.strip() for line in ci.splitlines() if line.startswith("python3 -m ")]
    dev_line = QUICK_START.split("```bash", 2)[2].split("```", 1)[0]
    tests_section = TEXT.split("## Tests", 1)[1].split("\n## ", 1)[0]
    for step in ci_steps:
        if "pip install" in step and "torch" in step:
            continue  # CI pins the torch it tests; users install theirs (see Install)
        words = step.replace("python3", "python").replace("--quiet ", "")
        words = words.replace("python -m pip", "pip")
        if words.endswith("-m slow"):  # the second run, which the Tests section names
            assert f"`{words}`" in tests_section.replace("\n", " ")
            continue
        # CI adds the gpu extra (Triton, for its tests under the interpreter)
        assert words.replace("[dev,gpu]", "[dev]") in dev_line, words
        if "[dev,gpu]" in words:
            assert "`.[dev,gpu]`" in tests_section


def test_install_lines_are_right_for_cpu_and_cuda():
    install = TEXT.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in install
    assert "Python 3.10 or newer" in install and "C\ncompiler" in install
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()


def test_readme_speaks_to_the_user():
    for phrase in ("../shared", "/work/", "this machine", "this session", "sessions", "here)"):
        assert phrase not in TEXT, phrase
    # the order a newcomer needs: what it is, two commands, the layer, the toolkit, results
    headings = [h for h in re.findall(r"^## (.+)$", TEXT, flags=re.M)]
    order = ["Quick start", "Install", "Use the layer in your model", "Language-model toolkit"]
    assert headings[: len(order)] == order
    assert headings.index("Results") > headings.index("Language-model toolkit")


def test_citation_and_licence():
    assert "@inproceedings{melis2020mogrifier," in TEXT and "Mogrifier {LSTM}" in TEXT
    licence = (ROOT / "LICENSE").read_text()
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert licence.startswith("MIT License")


def test_docs_and_experiments_speak_to_the_user():
    """No path or wording of the machines moglstm was developed on outside the README either."""
    texts = {p: p.read_text() for p in [*ROOT.glob("docs/*.md"), *ROOT.glob("experiments/*.py")]}
    for path, text in texts.items():
        phrases = ("/work/", "../shared", "project's machine", "project's shared", "the shared ")
        for phrase in phrases:  # "a shared machine" in general advice is fine
            assert phrase not in text, f"{path.name}: {phrase}"


def test_results_table_gives_the_exact_command():
    """The README's 'measured with' command sets what docs/reproduce.md says the run used."""
    import importlib.util

    path = ROOT / "experiments" / "ptb_small_vs_lstm.py"
    spec = importlib.util.spec_from_file_location("ptb_small_vs_lstm", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table = TEXT.split("## Results", 1)[1]
    readme = re.search(r"`python experiments/ptb_small_vs_lstm\.py ([^`]*)`", table).group(1)
    block = re.search(
        r"```bash\n(python experiments/ptb_small_vs_lstm\.py[^`]*--steps 1500[^`]*)```",
        (ROOT / "docs" / "reproduce.md").read_text(),
    ).group(1)
    used = shlex.split(block.replace("\\\n", " "))[2:]
    settings = ("steps", "eval_every", "eval_tokens", "set")
    want, got = script.parse_args(used), script.parse_args(shlex.split(readme))
    assert {k: getattr(got, k) for k in settings} == {k: getattr(want, k) for k in settings}
