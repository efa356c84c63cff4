"""No lost work: SIGINT/SIGTERM save the step reached, train.max_time, failed starts, time left.

The signal tests run ``moglstm train`` in a subprocess that sends itself real signals
from a step hook, so the step a signal arrives at is exact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from moglstm.lm.config import DataConfig
from moglstm.lm.report import read_run
from moglstm.lm.runs.folder import resume_config
from moglstm.lm.stopping import format_duration, parse_duration
from moglstm.lm.train import train
from tests import processes
from tests.lm.test_train import (
    assert_same_checkpoint,
    comparable,
    make_cfg,
    read_metrics,
    with_train,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[2] / "src"

# `moglstm train` whose loop sends this process the signals in $SIGNALS (comma-separated
# names) right after step $AT
_SIGNALLING_CLI = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import moglstm.lm.train as T

    torch.set_num_threads(1)
    real = T.train

    def train(cfg, resume=False, *, quiet=False, on_step=None):
        def hook(step, metrics):
            if step == int(os.environ["AT"]):
                for name in os.environ["SIGNALS"].split(","):
                    os.kill(os.getpid(), getattr(signal, name))
        return real(cfg, resume, quiet=quiet, on_step=hook)

    T.train = train
    from moglstm import cli
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def tiny_overrides(data: DataConfig) -> list[str]:
    """The make_cfg run as command-line overrides."""
    return [
        "data.corpus=text",
        f"data.path={data.path}",
        "data.batch_size=4",
        "data.bptt=8",
        "data.eval_batch_size=2",
        "data.variable_length=true",
        "model.hidden_size=16",
        "model.mogrify_rounds=2",
        "model.input_dropout=0.1",
        "model.layer_dropout=0.1",
        "model.state_dropout=0.1",
        "model.output_dropout=0.1",
        "train.lr=0.01",
        "train.max_steps=12",
        "train.eval_every=4",
        "train.log_every=2",
        "train.schedule=plateau",
        "train.seed=3",
        "train.device=cpu",
        "train.eval_max_tokens=200",
    ]


def run_signalled(tmp_path: Path, data: DataConfig, at: int, signals: str, name: str):
    env = {**os.environ, "PYTHONPATH": str(SRC), "AT": str(at), "SIGNALS": signals}
    cmd = [sys.executable, "-c", _SIGNALLING_CLI, "train", "--out-dir", str(tmp_path)]
    cmd += ["--name", name, "--quiet", *tiny_overrides(data)]
    return processes.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["counters"]["step"]


# --------------------------------------------------------------------------- durations


def test_parse_duration_reads_units_and_seconds():
    assert parse_duration("90m") == parse_duration("1h30m") == parse_duration("1.5h") == 5400
    assert parse_duration("45s") == 45 and parse_duration("2d") == 172800
    assert parse_duration("3600") == parse_duration(3600) == 3600


@pytest.mark.parametrize("bad", ["", "soon", "10x", "1h30", "-5m", "0", "0m", True])
def test_parse_duration_rejects_what_is_not_a_duration(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_saves_the_step_reached_and_the_run_resumes_exactly(
    signal_name, status, word_data_config, tmp_path
):
    result = run_signalled(tmp_path, word_data_config, 5, signal_name, "stopped")
    assert result.returncode == status, result.stderr
    run_dir = tmp_path / "stopped"
    # the step in progress finished; last.pt is at step 5, not at the validation of step 4
    assert checkpoint_step(run_dir / "last.pt") == 5
    assert f"{signal_name} received" in result.stderr
    assert f"stopped at step 5 ({signal_name} received)" in result.stderr
    assert f"moglstm train --resume {run_dir}" in result.stderr
    assert "stopped: " + signal_name in result.stdout  # the results are still printed
    # the checkpoint holds the time trained so far and step 5's loss, not logged yet
    saved = torch.load(run_dir / "last.pt", weights_only=True)["counters"]
    assert saved["elapsed"] > 0 and saved["window_tokens"] > 0
    assert read_run(run_dir).elapsed == saved["elapsed"]  # `report`: later than any log line
    # resuming ends bit for bit where a run that never stopped ends
    resumed = train(resume_config(run_dir), resume=True, quiet=True)
    assert resumed["elapsed"] > saved["elapsed"]  # the time before the signal counts
    cfg = make_cfg(dataclasses.replace(word_data_config, variable_length=True), tmp_path, "whole")
    train(cfg, quiet=True)
    assert_same_checkpoint(run_dir / "last.pt", tmp_path / "whole" / "last.pt")
    # the same log lines, the first after the resume (step 6: steps 5 and 6) included
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(tmp_path / "whole"))
    assert min(r["elapsed"] for r in read_metrics(run_dir) if r["step"] > 5) > saved["elapsed"]


def test_a_second_ctrl_c_quits_at_once(word_data_config, tmp_path):
    result = run_signalled(tmp_path, word_data_config, 5, "SIGINT,SIGINT", "twice")
    assert result.returncode == 130, result.stderr
    run_dir = tmp_path / "twice"
    assert checkpoint_step(run_dir / "last.pt") == 4  # nothing more was saved
    assert "interrupted; last.pt is kept" in result.stderr
    assert f"moglstm train --resume {run_dir}" in result.stderr


def test_max_time_stops_cleanly_with_a_checkpoint(word_data_config, tmp_path):
    cfg = make_cfg(word_data_config, tmp_path, max_steps=100_000, max_time="5s")
    start = time.perf_counter()
    results = train(cfg, quiet=True)
    took = time.perf_counter() - start
    assert results["stopped"] == "max_time"
    assert 0 < results["step"] < 100_000
    assert checkpoint_step(tmp_path / "run" / "last.pt") == results["step"]
    assert results["valid_loss"] is not None  # the final validation was made
    assert took < 5.0 + 3.0  # the budget, plus slack for a busy machine
    # a resumed session gets its own budget (train.max_time may change on resume)
    again = train(resume_config(tmp_path / "run", ["train.max_time=3s"]), resume=True, quiet=True)
    assert again["stopped"] == "max_time" and again["step"] > results["step"]


def test_invalid_max_time_is_a_config_error(word_data_config, tmp_path):
    with pytest.raises(ValueError, match="train.max_time: 'soon' is not a duration"):
        train(make_cfg(word_data_config, tmp_path, max_time="soon"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- failed starts


def test_a_failed_start_leaves_no_run_folder(word_data_config, tmp_path):
    missing = dataclasses.replace(word_data_config, path=str(tmp_path / "no-such-corpus"))
    with pytest.raises(ValueError, match="does not exist"):
        train(make_cfg(missing, tmp_path, name="failed"))
    assert not (tmp_path / "failed").exists()


def test_a_failed_start_keeps_a_folder_that_was_there(word_data_config, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    missing = dataclasses.replace(word_data_config, path=str(tmp_path / "no-such-corpus"))
    with pytest.raises(ValueError):
        train(make_cfg(missing, tmp_path, name="mine"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- time left


def test_training_reports_the_expected_duration_and_time_left(word_data_config, tmp_path, caplog):
    cfg = with_train(make_cfg(word_data_config, tmp_path), max_steps=10, log_every=8)
    with caplog.at_level(logging.INFO, logger="moglstm"):
        train(cfg)  # not quiet; the bar is off (no terminal), so steps are logged
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("about ") and "to go: " in m and "s/step" in m for m in messages)
    assert any(m.startswith("step 8: train loss") and m.endswith(" left") for m in messages)
    assert not any("train.max_time=15m" in m for m in messages)  # a short run needs no bound


def test_a_nested_stop_passes_the_request_outwards() -> None:
    import os
    import signal

    from moglstm.lm.stopping import GracefulStop

    with GracefulStop() as outer:
        with GracefulStop() as inner:
            os.kill(os.getpid(), signal.SIGINT)
        assert inner.requested == outer.requested == "SIGINT"
        assert outer.handled_inside and not inner.handled_inside
        with pytest.raises(KeyboardInterrupt):  # the outer one has had its first signal
            os.kill(os.getpid(), signal.SIGINT)


def test_a_long_estimate_says_how_to_bound_the_run(word_data_config, tmp_path, caplog, monkeypatch):
    from moglstm.lm import train as train_module

    monkeypatch.setattr(train_module._Eta, "_BOUND_HINT", 0.0)  # every run counts as long
    cfg = with_train(make_cfg(word_data_config, tmp_path), max_steps=4)
    with caplog.at_level(logging.INFO, logger="moglstm"):
        train(cfg, quiet=True)
    estimate = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("about "))
    assert "train.max_time=15m bounds a run" in estimate and "--resume" in estimate


def test_the_bar_shows_its_fields_from_the_first_step_and_nothing_left_at_the_end(
    word_data_config, tmp_path, monkeypatch
):
    import io

    from tqdm import tqdm

    from moglstm.lm import train as train_module

    screen = io.StringIO()

    def shown_bar(*args, **kwargs):  # as on a terminal, redrawn at every step
        kwargs.update(disable=False, file=screen, mininterval=0, miniters=1)
        return tqdm(*args, **kwargs)

    monkeypatch.setattr(train_module, "tqdm", shown_bar)
    train(make_cfg(word_data_config, tmp_path, max_steps=6, log_every=4), quiet=False)
    frames = [f for f in screen.getvalue().split("\r") if "/6" in f]
    first = next(f for f in frames if " 1/6" in f)
    assert "loss=" in first and "ppl=" in first and "left=" in first  # before the first log
    assert frames[-1].rstrip().endswith("left=0s]")  # not the estimate of an earlier step


def test_a_signal_never_raises_inside_the_work_it_interrupts() -> None:
    """The handler only records the request: an exception at an arbitrary bytecode could
    cut a ``finally`` (the averaged weights swapped back) in two. Interruptible work polls."""
    import os
    import signal

    from moglstm.lm.stopping import GracefulStop, StopRequested

    with GracefulStop() as stop:
        with stop.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, raises nothing
            restored = True  # the `finally` of a swap-back would run to its end
        assert restored and stop.requested == "SIGTERM"
        with pytest.raises(StopRequested):  # entering after the signal stops at once
            with stop.interruptible():
                pass
