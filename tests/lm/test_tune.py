"""Tests for moglstm.lm.tune and ``moglstm tune``: small studies of tiny models on the CPU."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moglstm.cli import main
from moglstm.lm.config import load_preset
from moglstm.lm.report import find_runs, read_run
from moglstm.lm.tune import (
    Param,
    list_spaces,
    load_space,
    parse_duration,
    tune,
    tune_dynamic,
)
from tests import processes

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[2] / "src")


def write_space(folder: Path, corpus: Path, max_steps: int = 8, **extra: str) -> Path:
    """A tiny Mogrifier on the grammar corpus: learning rate and rounds searched."""
    overrides = [
        "data.corpus=text",
        f"data.path={corpus}",
        "data.batch_size=4",
        "data.bptt=8",
        "data.eval_batch_size=2",
        "model.hidden_size=12",
        "model.num_layers=1",
        f"train.max_steps={max_steps}",
        "train.eval_every=2",
        "train.log_every=2",
        "train.eval_max_tokens=200",
        "train.device=cpu",
    ]
    path = folder / "space.yaml"
    text = {
        "overrides": overrides,
        "space": {"train.lr": {"logfloat": [1e-6, 3e-2]}, "model.mogrify_rounds": {"int": [0, 2]}},
    }
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


def open_study(study_dir: Path, name: str = "space") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'study.db'}")


def counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials():
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.slow
def test_study_prunes_resumes_and_reports(tmp_path: Path, word_corpus_dir: Path) -> None:
    space = write_space(tmp_path, word_corpus_dir)
    out = tmp_path / "tune"
    study_dir = out / "space"
    # a good trial first, then a hopeless one (lr 1e-6) that the median pruner stops
    study_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="space", storage=f"sqlite:///{study_dir / 'study.db'}")
    study.enqueue_trial({"train.lr": 0.03, "model.mogrify_rounds": 2})
    study.enqueue_trial({"train.lr": 1e-6, "model.mogrify_rounds": 2})
    summary = tune(space, trials=2, out_dir=out, prune_startup=1, seed=0)
    assert (summary["complete"], summary["pruned"], summary["fail"]) == (1, 1, 0)
    assert summary["best_trial"] == 0 and summary["best_params"]["train.lr"] == 0.03
    assert summary["run_dir"] == str(study_dir / "trial-0000")
    done, pruned = read_run(study_dir / "trial-0000"), read_run(study_dir / "trial-0001")
    assert summary["best_ppl"] == pytest.approx(done.best_valid["ppl"])
    assert done.status == "done" and done.step == 8
    # the first validation (step 2) is the warm-up: pruned at the second
    assert pruned.status == "pruned" and pruned.step == 4
    assert done.config["train.lr"] == 0.03 and pruned.config["train.lr"] == 1e-6
    trial, cut = open_study(study_dir).trials
    assert trial.intermediate_values == {r["step"]: r["loss"] for r in done.valid}
    assert cut.user_attrs["pruned"].startswith("median pruner at step 4: best validation loss ")
    assert "> median" in cut.user_attrs["pruned"]
    # the table: best first, with state, objective, values, run folder and reason
    rows = summary["trials"]
    assert [(r["number"], r["state"]) for r in rows] == [(0, "complete"), (1, "pruned")]
    assert rows[0]["value"] == summary["best_value"] and rows[0]["params"]["train.lr"] == 0.03
    assert rows[1]["value"] == min(cut.intermediate_values.values())
    assert rows[1]["run_dir"] == str(study_dir / "trial-0001") and "median" in rows[1]["note"]
    # the command trains the best values as the trials were trained
    command = summary["command"]
    assert command.startswith("moglstm train --out-dir ") and "train.lr=0.03" in command
    assert main([*shlex.split(command)[1:], "--json", "--quiet"]) == 0
    best = read_run(out / "space-best")
    def same(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("name", "out_dir")}

    assert same(best.config) == same(done.config)  # the trial's config, only renamed
    assert best.best_valid["loss"] == pytest.approx(summary["best_value"])  # same seed, same bits

    # resumed: the budget is the study's total, so one more trial, then none
    summary = tune(space, trials=3, out_dir=out, prune_startup=1, seed=1)
    assert summary["complete"] + summary["pruned"] == 3
    assert tune(space, trials=3, out_dir=out)["complete"] == summary["complete"]
    assert [p.name for p in find_runs([study_dir])] == ["trial-0000", "trial-0001", "trial-0002"]


@pytest.mark.slow
def test_two_workers_share_the_sqlite_study(tmp_path: Path, word_corpus_dir: Path) -> None:
    space = write_space(tmp_path, word_corpus_dir)
    argv = ["tune", str(space), "--trials", "4", "--out-dir", str(tmp_path / "tune")]
    # both workers start their study together (past their imports), so each gets trials
    worker = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from moglstm.cli import main
        Path({str(tmp_path)!r}, f"ready-{{os.getpid()}}").touch()
        while len(list(Path({str(tmp_path)!r}).glob("ready-*"))) < 2:
            time.sleep(0.01)
        sys.exit(main({argv!r} + ["--pruner", "none"]))
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    with contextlib.ExitStack() as stack:  # both ended with their groups, on a timeout too
        workers = [
            stack.enter_context(
                processes.started(
                    [sys.executable, "-c", worker],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for _ in range(2)
        ]
        outputs = [w.communicate(timeout=300) for w in workers]
    ran = []
    for w, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stderr
        assert "complete: " in stdout
        ran.append({int(n) for n in re.findall(r"trial (\d+) complete", stderr)})
    assert all(ran) and not ran[0] & ran[1], ran  # each ran trials, none ran the same
    study = open_study(tmp_path / "tune" / "space")
    trials = [t for t in study.get_trials() if not t.user_attrs.get("skipped")]
    # --trials is the study's budget: exactly 4 run, whichever worker took the last one
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    skipped = [t for t in study.get_trials() if t.user_attrs.get("skipped")]
    assert all(t.state.name == "FAIL" and t.number >= 4 for t in skipped)
    assert ran[0] | ran[1] == {t.number for t in trials}
    dirs = [t.user_attrs["run_dir"] for t in trials]
    assert len(set(dirs)) == len(dirs)  # one run folder per trial
    assert all(read_run(d).status == "done" for d in dirs)


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_from_its_checkpoint(
    tmp_path: Path, word_corpus_dir: Path
) -> None:
    space = write_space(tmp_path, word_corpus_dir, max_steps=16)
    out = tmp_path / "tune"
    slow_worker = textwrap.dedent(
        f"""
        import time
        from moglstm.lm import tune
        call = tune._ValidationReporter.__call__
        def slow(self, step, info):
            time.sleep(0.3)
            call(self, step, info)
        tune._ValidationReporter.__call__ = slow
        tune.tune({str(space)!r}, trials=1, out_dir={str(out)!r}, heartbeat=1, pruner="none")
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-c", slow_worker], env=env, start_new_session=True
    )
    checkpoint = out / "space" / "trial-0000" / "last.pt"
    try:
        wait_for(checkpoint, worker)
    finally:
        end_group(worker)  # killed: its trial stays RUNNING until its heartbeat is stale
    killed_at = read_run(checkpoint.parent).step
    assert 0 < killed_at < 16
    # Stale once the database clock is more than twice the interval past the last beat;
    # SQLite's clock has whole seconds, so 2.5 s could read as 2 (not stale): wait 4.
    time.sleep(4.0)
    summary = tune(space, trials=1, out_dir=out, heartbeat=1, pruner="none")
    assert (summary["complete"], summary["fail"]) == (1, 1)
    study = open_study(out / "space")
    failed, retried = study.trials
    assert retried.params == failed.params
    assert retried.user_attrs["run_dir"] == str(checkpoint.parent)  # resumed in place
    run = read_run(checkpoint.parent)
    assert run.status == "done" and [r["step"] for r in run.valid] == list(range(2, 17, 2))


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_while_another_uses_the_budget(
    tmp_path: Path, word_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed trial holds its place in the budget until its heartbeat is stale; then it
    is failed and its retry, not a new trial, takes the place: nothing stays RUNNING."""
    from moglstm.lm import tune as tune_module

    space = write_space(tmp_path, word_corpus_dir, max_steps=16)
    out = tmp_path / "tune"
    argv = ["tune", str(space), "--trials", "2", "--out-dir", str(out), "--pruner", "none"]
    worker = start_group([*argv, "--heartbeat", "1"], tmp_path)
    try:
        wait_for(out / "space" / "trial-0000" / "last.pt", worker)
    finally:
        end_group(worker)  # killed: trial 0 RUNNING, its heartbeat not yet stale
    call = tune_module._ValidationReporter.__call__

    def slow(self: object, step: int, info: dict) -> None:  # longer than the grace period
        time.sleep(0.25)
        call(self, step, info)

    monkeypatch.setattr(tune_module._ValidationReporter, "__call__", slow)
    summary = tune(space, trials=2, out_dir=out, heartbeat=1, pruner="none")
    study = open_study(out / "space")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert (summary["complete"], summary["fail"], summary["running"]) == (2, 1, 0)
    retry = study.trials[2]
    assert retry.user_attrs["run_dir"] == str(out / "space" / "trial-0000")  # resumed


def test_hyperband_and_time_budget(tmp_path: Path, word_corpus_dir: Path) -> None:
    space = write_space(tmp_path, word_corpus_dir)
    start = time.monotonic()
    summary = tune(space, timeout=0.1, out_dir=tmp_path / "t", pruner="hyperband")
    assert summary["complete"] + summary["pruned"] == 1  # no new trial after the budget
    assert time.monotonic() - start < 60


def test_dynamic_evaluation_tuning(
    tmp_path: Path, word_corpus_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    space = write_space(tmp_path, word_corpus_dir)
    tune(space, trials=1, out_dir=tmp_path / "t", pruner="none")
    run = tmp_path / "t" / "space" / "trial-0000"
    summary = tune_dynamic(run, trials=3, max_tokens=120, seed=0, device="cpu")
    assert summary["complete"] == 3 and (run / "dynamic.db").is_file()
    assert set(summary["best_params"]) == {"dynamic.lr", "dynamic.decay"}
    lr = summary["best_params"]["dynamic.lr"]
    assert f"--dynamic-lr {lr}" in summary["command"]
    assert summary["best_ppl"] > 1
    # the printed command runs as it is
    assert (
        main(
            [
                "tune",
                "--dynamic",
                str(run),
                "--trials",
                "4",
                "--max-tokens",
                "120",
                "--device",
                "cpu",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] == 4  # resumed: one more
    argv = result["command"].split()[1:]
    assert main([*argv, "--max-tokens", "120", "--device", "cpu", "--json"]) == 0
    with pytest.raises(ValueError, match="dynamic evaluation tunes"):
        tune_dynamic(run, space, trials=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_dynamic_study_fails_a_dead_workers_trial_by_its_heartbeat(
    tmp_path: Path, word_corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    space = write_space(tmp_path, word_corpus_dir)
    tune(space, trials=1, out_dir=tmp_path / "t", pruner="none")
    run = tmp_path / "t" / "space" / "trial-0000"
    # a worker that took a trial, beat once, and died
    storage = optuna.storages.RDBStorage(f"sqlite:///{run / 'dynamic.db'}", heartbeat_interval=1)
    dead = optuna.create_study(study_name="dynamic", storage=storage)
    trial = dead.ask({"dynamic.lr": optuna.distributions.FloatDistribution(3e-6, 3e-4, log=True)})
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3.5)  # stale: twice the interval, on SQLite's whole-second clock
    caplog.set_level("INFO", logger="moglstm.lm.tune")
    summary = tune_dynamic(run, trials=1, max_tokens=120, device="cpu", heartbeat=1)
    states = [t.state.name for t in optuna.load_study(study_name="dynamic", storage=storage).trials]
    assert states[0] == "FAIL" and "RUNNING" not in states and summary["complete"] == 1
    # progress: the gradients (bounded by default) and each trial are announced
    assert "mean squared gradients over " in caplog.text and "scoring 120 validation" in caplog.text
    assert "--dynamic-grad-batches 200" in summary["command"]


def test_ctrl_c_stops_a_dynamic_study_within_its_trial(
    tmp_path: Path, word_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moglstm.lm import progress

    space = write_space(tmp_path, word_corpus_dir, max_steps=2)
    tune(space, trials=1, out_dir=tmp_path / "t", pruner="none")
    run = tmp_path / "t" / "space" / "trial-0000"

    class Interrupting(progress.ScoreProgress):
        def update(self, tokens, loss_sum):  # the first scored window: Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            super().update(tokens, loss_sum)

    monkeypatch.setattr(progress, "ScoreProgress", Interrupting)
    summary = tune_dynamic(run, trials=5, max_tokens=120, device="cpu")
    assert summary["interrupted"] == "SIGINT" and summary["complete"] == 0
    storage = f"sqlite:///{run / 'dynamic.db'}"
    (trial,) = optuna.load_study(study_name="dynamic", storage=storage).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"] == "SIGINT"


def test_space_files(tmp_path: Path) -> None:
    names = list_spaces()
    for name in ("ptb-paper", "ptb-paper-lstm", "wt2-paper", "ptb-char-paper", "enwik8-paper"):
        assert name in names
    for name in names:
        space = load_space(name)
        if name == "dynamic":
            continue
        from moglstm.lm.tune import check_space

        check_space(space, space.base_config())  # every bound is a valid config
        assert load_preset(space.preset).name == space.preset
    mog, lstm = load_space("ptb-paper"), load_space("ptb-paper-lstm")
    assert {p.key for p in mog.params} - {p.key for p in lstm.params} == {
        "model.mogrifier.rounds",
        "model.mogrifier.rank",
    }


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("space: {train.lr: {uniform: [0, 1]}}", "kind 'uniform' is not one of"),
        ("space: {train.lr: {logfloat: [0, 1]}}", "needs low > 0"),
        ("space: {train.lr: {float: [1, 0]}}", "above high"),
        ("space: {train.lr: {logfloat: [.nan, 1.0e-2]}}", "bound nan is not finite"),
        ("space: {train.lr: {float: [0, .inf]}}", "bound inf is not finite"),
        ("space: {model.num_layers: {int: [1.5, 3]}}", "must be numbers"),
        ("space: {train.lr: {choice: []}}", "non-empty"),
        ("space: {train.lr: 0.1}", "must be one of"),
        ("spaces: {}", "non-empty 'space:'"),
        ("space: {train.lr: {float: [0, 1]}}\nextra: 1", r"unknown key\(s\) \['extra'\]"),
    ],
)
def test_bad_space_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_space(path)


def test_unknown_keys_and_bad_values_fail_before_any_trial(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("space: {model.hiden_size: {int: [8, 16]}}")
    with pytest.raises(ValueError, match="model.hiden_size"):
        tune(path, trials=1, out_dir=tmp_path)
    path.write_text("space: {model.input_dropout: {float: [0.0, 1.5]}}")
    with pytest.raises(ValueError, match="model.input_dropout"):
        tune(path, trials=1, out_dir=tmp_path)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="trial budget"):
        tune("ptb-small", out_dir=tmp_path)
    with pytest.raises(ValueError, match="trials=0"):
        tune("ptb-small", trials=0, out_dir=tmp_path)
    assert not list(tmp_path.glob("*/study.db"))
    with pytest.raises(FileNotFoundError, match="shipped space"):
        load_space("nope")
    assert main(["tune", str(path), "--trials", "1", "--out-dir", str(tmp_path)]) == 2


def test_choice_and_int_suggestions() -> None:
    trial = optuna.trial.FixedTrial({"a": "[0.0, 0.999]", "b": 3, "c": 0.5})
    assert Param("a", "choice", ([0.0, 0.9], [0.0, 0.999])).suggest(trial) == [0.0, 0.999]
    assert Param("b", "logint", (1, 8)).suggest(trial) == 3
    assert Param("c", "float", (0, 1)).suggest(trial) == 0.5


def test_durations() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200 and parse_duration(None) is None
    with pytest.raises(ValueError, match="time budget"):
        parse_duration("soon")


def test_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--list"]) == 0
    assert "ptb-paper " in capsys.readouterr().out


def test_without_optuna(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from moglstm.lm.report import MissingExtraError

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna: ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'moglstm\[tune\]'"):
        tune("ptb-small", trials=1, out_dir=tmp_path)
    assert main(["tune", "ptb-small", "--trials", "1", "--out-dir", str(tmp_path)]) == 2
    assert "optuna" in capsys.readouterr().err
    assert main(["tune", "--list"]) == 0  # listing needs no optuna


# --------------------------------------------------------------------------- stopping a study

# a worker whose validations take a while, so a signal finds a trial training
SLOW_WORKER = """
import sys, time
from moglstm.lm import tune
call = tune._ValidationReporter.__call__
def slow(self, step, info):
    time.sleep(0.2)
    call(self, step, info)
tune._ValidationReporter.__call__ = slow
from moglstm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_group(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    """``moglstm`` ARGV (with slow validations) in its own process group, as a terminal's
    foreground job: Ctrl-C there sends SIGINT to the whole group."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_WORKER, *argv],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def end_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.is_file(), process.communicate(timeout=10) if process.poll() is not None else ""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_study_and_the_same_command_resumes_it(
    tmp_path: Path, word_corpus_dir: Path, name: str
) -> None:
    space = write_space(tmp_path, word_corpus_dir, max_steps=16)
    out = tmp_path / "tune"
    argv = ["tune", str(space), "--trials", "3", "--out-dir", str(out), "--pruner", "none"]
    worker = start_group(argv, tmp_path)
    try:
        wait_for(out / "space" / "trial-0000" / "last.pt", worker)
        os.killpg(worker.pid, getattr(signal, name))
        started = time.monotonic()
        stdout, stderr = worker.communicate(timeout=60)
    finally:
        end_group(worker)
    assert time.monotonic() - started < 30  # the trial's step, a checkpoint, and out
    assert worker.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], stderr
    assert f"stopped ({name} received)" in stderr and "Continue with: moglstm tune " in stderr
    assert "Traceback" not in stderr
    study = open_study(out / "space")
    interrupted, waiting = study.trials  # the study stopped: no trial after it
    assert interrupted.state == optuna.trial.TrialState.FAIL  # never COMPLETE with inf
    assert interrupted.user_attrs["interrupted"] == name
    step = interrupted.user_attrs["step"]
    run = read_run(out / "space" / "trial-0000")
    assert run.step == step and 0 < step < 16
    assert f"trial 0 (saved at step {step}" in stderr
    assert waiting.state == optuna.trial.TrialState.WAITING
    assert waiting.system_attrs["fixed_params"] == interrupted.params
    assert waiting.user_attrs["resumes"] == 0
    table = stdout[stdout.index("trial  state") :]
    assert "interrupted by " + name in table

    # the same command again: trial 0 goes on from its last.pt, then the budget's rest
    assert main(argv + ["--json"]) == 0
    study = open_study(out / "space")
    assert counts(study) == {"FAIL": 1, "COMPLETE": 3}
    run = read_run(out / "space" / "trial-0000")
    assert run.status == "done" and [r["step"] for r in run.valid] == list(range(2, 17, 2))
    assert study.trials[1].user_attrs["run_dir"] == str(run.path)


@pytest.mark.slow
def test_a_second_ctrl_c_quits_at_once(tmp_path: Path, word_corpus_dir: Path) -> None:
    space = write_space(tmp_path, word_corpus_dir, max_steps=400)
    out = tmp_path / "tune"
    argv = ["tune", str(space), "--trials", "3", "--out-dir", str(out), "--pruner", "none"]
    worker = start_group(argv, tmp_path)
    try:
        wait_for(out / "space" / "trial-0000" / "last.pt", worker)
        os.killpg(worker.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGINT)
        stdout, stderr = worker.communicate(timeout=60)
    finally:
        end_group(worker)
    assert worker.returncode == 130 and "moglstm tune: interrupted" in stderr, stderr
    assert "Continue the study with: moglstm tune " in stderr
    (trial,) = open_study(out / "space").trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert read_run(out / "space" / "trial-0000").step < 400


@pytest.mark.slow
def test_a_signal_before_the_trial_trains_stops_at_its_first_step(
    tmp_path: Path, word_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a trial sets up (only the study's handler is in place): the trial
    stops at its first step, is marked failed, and no further trial starts."""
    from moglstm.lm import tune as tune_module

    quiet = tune_module._quiet_training

    @contextlib.contextmanager
    def interrupted_setup():
        os.kill(os.getpid(), signal.SIGINT)
        with quiet():
            yield

    monkeypatch.setattr(tune_module, "_quiet_training", interrupted_setup)
    space = write_space(tmp_path, word_corpus_dir)
    summary = tune(space, trials=3, out_dir=tmp_path / "t", pruner="none")
    assert summary["interrupted"] == "SIGINT"
    first, waiting = open_study(tmp_path / "t" / "space").trials
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"] == "SIGINT"
    assert waiting.state.name == "WAITING" and waiting.user_attrs["resumes"] == 0
    run = read_run(tmp_path / "t" / "space" / "trial-0000")
    assert run.status == "interrupted" and run.ended["step"] == 1


def test_a_resume_of_a_resume_trains_in_the_first_trials_folder(tmp_path: Path) -> None:
    """Interrupted twice: trial 1 resumed trial 0 in trial-0000 and was interrupted in turn;
    the trial that resumes trial 1 goes on in trial-0000, not in an empty trial-0001."""
    from moglstm.lm.tune import _trial_folder

    study = optuna.create_study()
    first = study.ask()
    first.set_user_attr("run_dir", str(tmp_path / "trial-0000"))
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={"resumes": 0})
    second = study.ask()
    second.set_user_attr("run_dir", str(tmp_path / "trial-0000"))  # as the objective records
    study.tell(second, state=optuna.trial.TrialState.FAIL)
    assert _trial_folder(study, 1, tmp_path) == tmp_path / "trial-0000"
    assert _trial_folder(study, 0, tmp_path) == tmp_path / "trial-0000"
    assert _trial_folder(study, 7, tmp_path) == tmp_path / "trial-0007"  # nothing recorded
    # a recorded folder is taken by name only: never a folder outside the study
    third = study.ask()
    third.set_user_attr("run_dir", "/elsewhere/trial-0002")
    assert _trial_folder(study, third.number, tmp_path) == tmp_path / "trial-0002"


def test_a_queued_resume_taken_after_a_signal_is_queued_again() -> None:
    from moglstm.lm.tune import StudyInterrupted, _Session

    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5}, user_attrs={"resumes": 3})
    session = _Session(optuna, study, trials=None)
    session.stop.requested = "SIGINT"  # the signal came between two trials
    trial = study.ask()
    with pytest.raises(StudyInterrupted):
        session.start_trial(trial)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    (waiting,) = study.get_trials(states=[optuna.trial.TrialState.WAITING])
    assert waiting.user_attrs["resumes"] == 3
    assert waiting.system_attrs["fixed_params"] == {"x": 0.5}
