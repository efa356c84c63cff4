"""Tests for moglstm.lm.report and ``moglstm report``: curves and tables of real runs."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from moglstm.cli import main
from moglstm.lm.config import DataConfig, RunConfig, TrainConfig, model_config
from moglstm.lm.evaluate import evaluate
from moglstm.lm.report import (
    EVALUATIONS_FILE,
    MissingExtraError,
    config_differences,
    find_runs,
    markdown_table,
    read_run,
    report,
)
from moglstm.lm.runlock import RunLock
from moglstm.lm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(data: DataConfig, out_dir: Path, name: str, **model_kw: Any) -> RunConfig:
    model = {"kind": "mogrifier", "hidden_size": 12, "num_layers": 1, "mogrify_rounds": 2}
    model.update(model_kw)
    return RunConfig(
        name=name,
        out_dir=str(out_dir),
        data=data,
        model=model_config(**model),
        train=TrainConfig(
            lr=0.01, max_steps=8, eval_every=4, log_every=2, device="cpu", eval_max_tokens=200
        ),
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A Mogrifier and an LSTM run of 8 steps on the grammar corpus; the LSTM is tested."""
    from tests.conftest import write_text_corpus

    corpus = write_text_corpus(tmp_path_factory.mktemp("corpus"))
    data = DataConfig(corpus="text", path=str(corpus), batch_size=4, bptt=8, eval_batch_size=2)
    out = tmp_path_factory.mktemp("runs")
    train(tiny_run(data, out, "mog"), quiet=True)
    train(tiny_run(data, out, "lstm", kind="lstm", mogrify_rounds=0), quiet=True)
    evaluate(out / "lstm", "test", device="cpu")
    return [out / "mog", out / "lstm"]


def test_read_run_gathers_curves_params_and_evaluations(two_runs: list[Path]) -> None:
    mog, lstm = (read_run(p) for p in two_runs)
    assert [r["step"] for r in mog.valid] == [4, 8]
    assert [r["step"] for r in mog.train] == [2, 4, 6, 8]
    assert mog.metric == "ppl" and mog.status == "done" and not mog.running
    assert mog.params and lstm.params and mog.params != lstm.params
    assert mog.test is None
    assert lstm.test is not None and lstm.test["split"] == "test"
    assert lstm.best_valid["loss"] == min(r["loss"] for r in lstm.valid)


def test_table_shows_differences_and_results(two_runs: list[Path]) -> None:
    runs = [read_run(p) for p in two_runs]
    assert config_differences(runs) == ["model.kind", "model.mogrifier.rounds"]
    table = markdown_table(runs)
    lines = table.splitlines()
    assert lines[0].split(" | ")[:4] == ["| run", "state", "step", "config"]
    assert len(lines) == 4
    # best validation first
    first, second = sorted(runs, key=lambda r: r.best_valid["loss"])
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {first.name}", f"| {second.name}"]
    mog_row, lstm_row = sorted(lines[2:], key=lambda line: "| lstm " in line)
    assert "model.kind=mogrifier, model.mogrifier.rounds=2" in mog_row
    assert "model.kind=lstm, model.mogrifier.rounds=0" in lstm_row
    best = runs[1].best_valid
    assert f"ppl {best['ppl']:.2f} (step {best['step']})" in lstm_row
    test = runs[1].test
    assert f"ppl {test['ppl']:.2f} (batch 2, {test['tokens']:,} tokens)" in lstm_row
    cells = [c.strip() for c in mog_row.strip("|").split("|")]
    assert cells[1] == "done" and cells[2] == "8"
    assert cells[7] == "-"  # no test evaluation of this run
    assert float(cells[8].replace(",", "")) > 0  # tokens/s


def test_report_writes_png_svg_and_markdown(two_runs: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = report(two_runs, tmp_path / "cmp", title="mog vs lstm")
    names = sorted(p.name for p in result["files"])
    assert names == ["cmp.md", "cmp.png", "cmp.svg"]
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "cmp.svg").read_text()
    assert "<svg" in svg and "mog vs lstm" in svg
    assert (tmp_path / "cmp.md").read_text() == result["table"]


def test_a_run_in_progress(two_runs: list[Path], tmp_path: Path) -> None:
    """Read while training: the lock is held and a record is half written."""
    data = read_run(two_runs[0]).config
    cfg = tiny_run(
        DataConfig(corpus="text", path=data["data.path"], batch_size=4, bptt=8, eval_batch_size=2),
        tmp_path,
        "live",
    )
    seen: dict[int, Any] = {}

    def peek(step: int, _: dict[str, float]) -> None:
        if step == 5:
            with open(tmp_path / "live" / "metrics.jsonl", "a") as f:
                f.write('{"step": 6, "split": "tr')  # a line being written
            seen[step] = read_run(tmp_path / "live")
            text = (tmp_path / "live" / "metrics.jsonl").read_text()
            (tmp_path / "live" / "metrics.jsonl").write_text(text[: text.rindex("\n") + 1])

    train(cfg, quiet=True, on_step=peek)
    live = seen[5]
    assert live.running and live.status == "running"
    assert [r["step"] for r in live.valid] == [4] and live.step == 4
    assert live.params is not None  # from the step-4 checkpoint
    assert read_run(tmp_path / "live").status == "done"
    assert "| live | running | 4 |" in markdown_table([live])


def test_stopped_run_and_held_lock(two_runs: list[Path], tmp_path: Path) -> None:
    run = read_run(two_runs[0])
    run.config["train.max_steps"] = 100
    run.ended = None  # a run of an older version: no record of how it ended
    assert run.status == "stopped"
    with RunLock(two_runs[0]):
        assert read_run(two_runs[0]).running


def test_folder_of_runs_and_missing_paths(two_runs: list[Path], tmp_path: Path) -> None:
    assert find_runs([two_runs[0].parent]) == sorted(two_runs)
    with pytest.raises(FileNotFoundError, match="not found"):
        find_runs([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="holds none"):
        find_runs([tmp_path])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        read_run(tmp_path)


def test_bpc_runs_and_mixed_levels(tmp_path: Path, char_data_config: DataConfig) -> None:
    pytest.importorskip("matplotlib")
    from moglstm.lm.report import plot_runs

    train(tiny_run(char_data_config, tmp_path, "char"), quiet=True)
    run = read_run(tmp_path / "char")
    assert run.metric == "bpc"
    assert f"bpc {run.valid[-1]['bpc']:.3f}" in markdown_table([run])
    fig = plot_runs([run])
    assert fig.axes[0].get_ylabel() == "validation bits per character"
    word = read_run(tmp_path / "char")
    word.valid = [{**r, "ppl": math.exp(r["loss"])} for r in word.valid]
    word.train = []
    for r in word.valid:
        r.pop("bpc")
    assert word.metric == "ppl"
    fig = plot_runs([run, word])
    assert fig.axes[0].get_ylabel() == "validation loss (nats/token)"


def test_cli_report(two_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "r"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (tmp_path / "figs" / "r.md").read_text()
    assert (tmp_path / "figs" / "r.png").is_file() and (tmp_path / "figs" / "r.svg").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_without_matplotlib(
    two_runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'moglstm\[plot\]'"):
        report(two_runs, tmp_path / "x")
    assert not list(tmp_path.iterdir())  # nothing half written
    assert main(["report", str(two_runs[0]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "--no-plot" in err
    assert main(["report", str(two_runs[0]), "--no-plot", "--out", str(tmp_path / "t")]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["t.md"]


def test_evaluations_are_recorded_per_call(two_runs: list[Path]) -> None:
    lines = (two_runs[1] / EVALUATIONS_FILE).read_text().splitlines()
    assert json.loads(lines[0])["split"] == "test"
    assert not (two_runs[0] / EVALUATIONS_FILE).exists()


def test_a_config_it_cannot_read_leaves_the_rest(two_runs: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    (copy / "config.yaml").write_text("model: [unclosed\n")
    run = read_run(copy)
    assert run.config == {} and [r["step"] for r in run.valid] == [4, 8]
    # no max_steps known, but status.json says the run reached it
    assert "| copy | done | 8 |" in markdown_table([run])


# --------------------------------------------------------------------------- states, studies


def test_states_of_runs_that_ended_otherwise(two_runs: list[Path], tmp_path: Path) -> None:
    """Each way a session ends, as status.json records it, and a session killed outright."""
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    status = copy / "status.json"
    cases = {
        '{"step": 8, "stopped": "SIGINT"}': "interrupted",
        '{"step": 8, "stopped": "SIGTERM"}': "interrupted",
        '{"step": 8, "stopped": "early_stop"}': "early stop",
        '{"step": 8, "stopped": "max_time"}': "time limit",
        '{"step": 8, "stopped": "error", "error": "TrialPruned: median pruner"}': "pruned",
        '{"step": 8, "stopped": "error", "error": "NonFiniteLossError: nan"}': "crashed",
        '{"step": 4, "stopped": "SIGINT"}': "crashed",  # a later session left no end: killed
        "not json": "crashed",
    }
    for text, state in cases.items():
        status.write_text(text)
        assert read_run(copy).status == state, text


def test_a_second_ctrl_c_is_recorded_as_interrupted(
    word_data_config: DataConfig, tmp_path: Path
) -> None:
    cfg = tiny_run(word_data_config, tmp_path, "cut")

    def interrupt(step: int, _: dict[str, float]) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True, on_step=interrupt)
    run = read_run(tmp_path / "cut")
    assert run.status == "interrupted" and run.ended["step"] == 3


@pytest.mark.slow
def test_a_study_s_trials_show_optuna_state_and_sort_by_result(
    tmp_path: Path, word_corpus_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    optuna = pytest.importorskip("optuna")
    from moglstm.lm.tune import tune
    from tests.lm.test_tune import write_space

    space = write_space(tmp_path, word_corpus_dir)
    study_dir = tmp_path / "tune" / "space"
    study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="space", storage=f"sqlite:///{study_dir / 'study.db'}")
    study.enqueue_trial({"train.lr": 0.03, "model.mogrify_rounds": 2})
    study.enqueue_trial({"train.lr": 1e-6, "model.mogrify_rounds": 2})
    tune(space, trials=2, out_dir=tmp_path / "tune", prune_startup=1, seed=0)
    out = tmp_path / "rep"
    argv = ["report", str(study_dir), "--out", str(out), "--no-plot", "--csv", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["state"], r["trial"], r["trial_state"]) for r in rows] == [
        ("trial-0000", "done", 0, "complete"),
        ("trial-0001", "pruned", 1, "pruned"),
    ]
    assert rows[0]["objective"] < rows[1]["objective"]
    assert rows[0]["objective"] == pytest.approx(study.trials[0].value)
    assert rows[0]["train.lr"] == 0.03 and rows[1]["train.lr"] == 1e-6  # differing config
    assert json.loads((tmp_path / "rep.json").read_text()) == rows
    import csv

    with open(tmp_path / "rep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == ["trial-0000", "trial-0001"]
    assert table[1]["trial_state"] == "pruned" and float(table[0]["objective"]) > 0
    md = (tmp_path / "rep.md").read_text()
    assert "| trial-0000 | done | 0 complete, loss " in md
    assert "| trial-0001 | pruned | 1 pruned" in md


def test_many_runs_stay_legible(two_runs: list[Path], tmp_path: Path) -> None:
    """30 runs: the best 8 named and coloured (no colour twice), the rest faint."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex

    from moglstm.lm.report import HIGHLIGHTED, LOAD_CAVEAT, plot_runs

    base = read_run(two_runs[0])
    runs = []
    for i in range(30):
        run = read_run(two_runs[0])
        run.path = tmp_path / f"run-{i:02d}"
        shift = (i * 7) % 30 / 10  # best runs not in name order
        run.valid = [{**r, "loss": r["loss"] + shift, "ppl": r["ppl"] * math.exp(shift)}
                     for r in base.valid]
        runs.append(run)
    fig = plot_runs(runs)
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    best = sorted(runs, key=lambda r: r.best_valid["loss"])[:HIGHLIGHTED]
    assert [label.split()[0] for label in labels[:-1]] == [r.name for r in best]
    assert labels[-1] == f"{30 - HIGHLIGHTED} more runs (faint)"
    colours = [to_hex(h.get_color()) for h in legend.legend_handles[:-1]]
    assert len(set(colours)) == HIGHLIGHTED
    lines = fig.axes[0].get_lines()
    faint = [line for line in lines if line.get_alpha() is not None and line.get_alpha() < 0.5]
    assert len(faint) == 30 - HIGHLIGHTED
    assert fig.axes[1].get_title() == LOAD_CAVEAT
    fig.savefig(tmp_path / "many.png", dpi=60)


def test_panels_before_the_first_validation_say_so(two_runs: list[Path]) -> None:
    pytest.importorskip("matplotlib")
    from moglstm.lm.report import plot_runs

    run = read_run(two_runs[0])
    run.valid, run.train = [], []
    fig = plot_runs([run])
    texts = [[t.get_text() for t in ax.texts] for ax in fig.axes[:4]]
    assert texts == [["no validation yet"]] * 2 + [["no training loss logged yet"]] * 2
