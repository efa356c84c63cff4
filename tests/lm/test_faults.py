"""Surviving faults: SIGKILL, corrupt and truncated checkpoints, a full disk, two runs
in one folder, and non-finite losses (train.nonfinite = stop | skip | rollback)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import random
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from moglstm.cli import main
from moglstm.lm import train as train_module
from moglstm.lm.config import DataConfig, ModelConfig, RunConfig, TrainConfig, validate
from moglstm.lm.policies import NonFiniteLossError
from moglstm.lm.runlock import RunFolderChangedError, RunLock, RunLockedError
from moglstm.lm.runs import checkpoint as checkpoint_module
from moglstm.lm.runs.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_newest_checkpoint,
    previous_path,
    remove_stale_temp_files,
    save_checkpoint,
)
from moglstm.lm.train import train
from tests import processes

KILL_SEED = 20240611  # the kill points are random, but repeatable


pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(corpus: Path, **train: Any) -> list[str]:
    """A tiny Mogrifier run with every source of state and randomness.

    Dropout (global RNG), variable-length windows (the stream's generator), carried
    state and the plateau schedule all have to survive an interruption.
    """
    settings = {
        "lr": 0.01,
        "max_steps": 12,
        "eval_every": 4,
        "log_every": 2,
        "schedule": "plateau",
        "seed": 3,
        "device": "cpu",
        "eval_max_tokens": 200,
        **train,
    }
    return [
        "data.corpus=text",
        f"data.path={corpus}",
        "data.batch_size=4",
        "data.bptt=8",
        "data.variable_length=true",
        "data.eval_batch_size=2",
        "model.hidden_size=16",
        "model.mogrify_rounds=2",
        "model.implementation=reference",  # the fused path is tested in tests/nn
        "model.input_dropout=0.1",
        "model.state_dropout=0.1",
        "model.output_dropout=0.1",
        *(f"train.{key}={value}" for key, value in settings.items()),
    ]


def make_cfg(corpus: Path, out_dir: Path, name: str = "run", **train: Any) -> RunConfig:
    from moglstm.lm.config import load_config

    return load_config(None, [*overrides(corpus, **train), f"name={name}", f"out_dir={out_dir}"])


def with_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(records: list[dict[str, Any]]) -> list[tuple]:
    """The deterministic part of metric records (timings differ from run to run)."""
    return [(r["step"], r["split"], r["loss"], r["lr"]) for r in records]


def assert_no_doubled_lines(run_dir: Path) -> None:
    keys = [(r["step"], r["split"]) for r in read_metrics(run_dir)]
    assert len(keys) == len(set(keys)), "a metric line was doubled"
    assert keys == sorted(keys, key=lambda k: (k[0], k[1] == "valid")), "lines out of order"


def _equal(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run_state(a: Path, b: Path) -> None:
    """torch.equal on every tensor of two checkpoints; equal counters (wall time aside)."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "data", "train_state", "vocab"):
        _equal(ca[key], cb[key], key)
    for key in ("torch", "python", "cuda"):  # NumPy's is unseeded: training never draws from it
        _equal(ca["rng"][key], cb["rng"][key], f"rng[{key!r}]")
    del ca["counters"]["elapsed"], cb["counters"]["elapsed"]
    assert ca["counters"] == cb["counters"]


def poison_training_loss(monkeypatch: pytest.MonkeyPatch, bad_calls: Any) -> None:
    """Make the training loss NaN on the calls numbered in ``bad_calls`` (1-based)."""
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["n"] in bad_calls else loss

    functional = types.SimpleNamespace(**vars(torch.nn.functional))
    functional.cross_entropy = cross_entropy  # validation scores through evaluate.py's F
    monkeypatch.setattr(train_module, "F", functional)


class Always:
    """``n in Always(k)`` for every ``n >= k``."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __contains__(self, n: object) -> bool:
        return isinstance(n, int) and n >= self.start


# --------------------------------------------------------------------------- SIGKILL


_LAUNCHED: list[subprocess.Popen] = []  # ended with their process groups by the test


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "moglstm", "train", *args, "--quiet"]
    with open(log, "a") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _LAUNCHED.append(process)
    return process


@pytest.fixture
def launched():
    """Ends whatever :func:`_launch` started, on a failure or timeout too."""
    yield
    while _LAUNCHED:
        processes.kill_group(_LAUNCHED.pop())


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _wait_for(process: subprocess.Popen, ready: Any) -> bool:
    """Poll until ``ready()`` or the process ends; whether it is still running."""
    while not ready() and process.poll() is None:
        time.sleep(0.002)
    return process.poll() is None


def _kill_at_random(
    process: subprocess.Popen, metrics: Path, old_inode: int | None, total: int, rng: Any
) -> bool:
    """SIGKILL ``process`` at a random metric line of its session, plus 0-40 ms.

    The session's metrics file is a new one: a fresh run creates it, a resume rewrites
    it (cut back to its checkpoint's step) by a rename, so its inode changes. The line
    is drawn after that, from those still to come (and after the first checkpoint,
    which a resume needs). Returns whether it was killed rather than finishing first.
    """
    if not _wait_for(process, lambda: _inode(metrics) not in (None, old_inode)):
        return False
    first = max(5, _lines(metrics) + 1)  # line 5 comes after the first checkpoint
    if first >= total:
        return False
    line, delay = rng.randint(first, total - 1), rng.uniform(0.0, 0.04)
    if not _wait_for(process, lambda: _lines(metrics) >= line):
        return False
    time.sleep(delay)
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_exact(make_text_corpus, tmp_path, launched):
    """Kill a training subprocess 4 times at random points; the end is bit-identical.

    Each kill lands at a random metric line still to come in that session (after the
    first checkpoint, which a resume needs) plus a random 0-40 ms, so kills hit
    training steps, validations and checkpoint writes. About 40 s on 2 cores (each
    start imports torch).
    """
    corpus, out = make_text_corpus(), tmp_path / "runs"
    args = [*overrides(corpus, max_steps=40, eval_every=3, log_every=1), "--out-dir", str(out)]
    log = tmp_path / "subprocess.log"
    reference = _launch([*args, "--name", "reference"], log)
    assert reference.wait(timeout=300) == 0, log.read_text()[-3000:]
    total = _lines(out / "reference" / "metrics.jsonl")  # 40 train + 14 valid lines

    rng = random.Random(KILL_SEED)
    run_dir, kills, starts, mid_write = out / "victim", 0, 0, 0
    metrics = run_dir / "metrics.jsonl"
    while kills < 4:
        resume = (run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists()
        old_inode = _inode(metrics)
        process = _launch([*args, "--name", "victim", *(["--resume"] if resume else [])], log)
        starts += 1
        if not _kill_at_random(process, metrics, old_inode, total, rng):
            assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        kills += 1
        mid_write += any(p.name.endswith(".tmp") for p in run_dir.iterdir())
    final = _launch([*args, "--name", "victim", "--resume"], log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]

    print(f"SIGKILLs survived: {kills} in {starts + 1} starts, {mid_write} during a write")
    assert kills >= 3
    assert_same_run_state(out / "reference" / "last.pt", run_dir / "last.pt")
    assert_same_run_state(out / "reference" / "best.pt", run_dir / "best.pt")
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(out / "reference"))
    assert_no_doubled_lines(run_dir)
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- corrupt files


def _payload(n: int) -> dict[str, Any]:
    return {"model": {"w": torch.arange(64.0) + n, "b": torch.full((8,), float(n))}, "n": n}


def _corruptions(good: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """Truncations, single flipped bytes across the whole file, and garbage."""
    cases = [(f"truncated to {n} bytes", good[:n]) for n in (0, 1, 30, 100, len(good) // 2)]
    cases += [("missing its last byte", good[:-1]), ("missing its last 22 bytes", good[:-22])]
    for offset in sorted(rng.sample(range(len(good)), 60)):
        flipped = bytearray(good)
        flipped[offset] ^= 1 << rng.randrange(8)
        cases.append((f"bit flipped at byte {offset}", bytes(flipped)))
    cases += [("zeroed", bytes(len(good))), ("random bytes", rng.randbytes(len(good)))]
    cases += [("text", b"not a checkpoint\n")]
    return cases


def test_corruptions_are_reported_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    """Every damage is either detected (fall back to last.prev.pt, named in a warning)
    or harmless (the file still loads the very same payload): never silently wrong."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    save_checkpoint(path, _payload(2), keep_previous=True)
    assert load_checkpoint(previous_path(path))["n"] == 1
    good = path.read_bytes()
    detected = harmless = 0
    cases = _corruptions(good, random.Random(7))
    for label, damaged in cases:
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moglstm.lm.runs.checkpoint"):
            payload, used = load_newest_checkpoint(path)
        if used == previous_path(path):
            detected += 1
            assert payload["n"] == 1, label
            assert str(path) in caplog.text and "skipping checkpoint" in caplog.text, label
        else:
            harmless += 1
            assert label.startswith("bit flipped"), f"{label}: went unnoticed"
            assert used == path, label
            _equal(payload, {**_payload(2), "format_version": 1}, label)
    print(f"corruptions tried: {len(cases)}; detected {detected}, harmless {harmless}")
    # harmless: flips in the archive's alignment padding and unused header fields,
    # about a third of this tiny file and a vanishing share of a real checkpoint
    assert harmless <= 25
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt.*truncated, corrupt|last\.pt.*zip"):
        load_checkpoint(path)


def test_both_checkpoints_bad_lists_both(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"junk")
    previous_path(path).write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"no readable checkpoint: .*last\.pt.*last\.prev\.pt"
    ):
        load_newest_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_newest_checkpoint(tmp_path / "other.pt")


class _FlakyFile:
    """A file whose writes corrupt one byte, or fail with ENOSPC after ``room`` bytes."""

    def __init__(self, inner: Any, *, flip_at: int | None = None, room: int | None = None):
        self.inner, self.flip_at, self.room, self.written = inner, flip_at, room, 0

    def write(self, data: Any) -> int:
        data = bytearray(data)
        if self.room is not None and self.written + len(data) > self.room:
            self.inner.write(data[: self.room - self.written])
            self.written = self.room
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.flip_at is not None and self.written <= self.flip_at < self.written + len(data):
            data[self.flip_at - self.written] ^= 0xFF  # silent corruption on the way to disk
        self.written += len(data)
        return self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __enter__(self) -> _FlakyFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.inner.close()


def _patch_writes(monkeypatch: pytest.MonkeyPatch, **flaky: Any) -> None:
    real = checkpoint_module._create_new
    monkeypatch.setattr(
        checkpoint_module, "_create_new", lambda tmp: _FlakyFile(real(tmp), **flaky)
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_writes_syncs_verifies_then_renames(tmp_path, monkeypatch):
    """The order that makes a save atomic and durable: write and fsync a temporary file,
    check it, link the old checkpoint to .prev (last.pt stays in place), rename the new
    one over it, fsync the folder."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1))
    steps: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link
    real_verify = checkpoint_module.verify_archive

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        steps.append(f"link {Path(src).name} -> {Path(dst).name[:8]}")
        real_link(src, dst, **kwargs)

    def fsync(fd: int) -> None:
        steps.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        steps.append(f"rename {Path(src).name[:8]} -> {Path(dst).name}")
        real_replace(src, dst)

    def verify(p: Any, *file: Any) -> None:
        steps.append(f"verify {Path(p).name[:8]}")
        real_verify(p, *file)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(checkpoint_module, "verify_archive", verify)
    save_checkpoint(path, _payload(2), keep_previous=True)
    assert steps == [
        "fsync file",
        "verify .last.pt",  # the temporary file, .last.pt.<pid>.<hex>.tmp
        "verify last.pt",  # the old checkpoint, before it is kept
        "link last.pt -> .last.pr",  # a second name for it: .last.prev.pt.<pid>.<hex>.tmp
        "rename .last.pr -> last.prev.pt",
        "rename .last.pt -> last.pt",  # last.pt was never missing
        "fsync folder",
    ]


def test_a_bad_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    save_checkpoint(path, _payload(2), keep_previous=True)
    before = _snapshot(tmp_path)
    _patch_writes(monkeypatch, flip_at=len(path.read_bytes()) // 2)
    with pytest.raises(CheckpointError, match=r"last\.pt.*did not read back intact"):
        save_checkpoint(path, _payload(3), keep_previous=True)
    assert _snapshot(tmp_path) == before  # nothing replaced, no temporary file left


def test_a_damaged_checkpoint_is_not_kept_as_the_previous_one(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    save_checkpoint(path, _payload(2), keep_previous=True)
    path.write_bytes(path.read_bytes()[:100])  # damaged on disk
    with caplog.at_level(logging.WARNING):
        save_checkpoint(path, _payload(3), keep_previous=True)
    assert "not keeping" in caplog.text
    assert load_checkpoint(path)["n"] == 3
    assert load_checkpoint(previous_path(path))["n"] == 1  # the good one stays


def test_disk_full_while_saving_is_clear_and_harmless(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    save_checkpoint(path, _payload(2), keep_previous=True)
    before = _snapshot(tmp_path)
    _patch_writes(monkeypatch, room=1000)
    with pytest.raises(OSError, match=r"could not save checkpoint .*last\.pt.*unchanged") as info:
        save_checkpoint(path, _payload(3), keep_previous=True)
    assert info.value.errno == errno.ENOSPC
    assert _snapshot(tmp_path) == before


def test_stale_temporary_files_are_removed(tmp_path):
    stale = [tmp_path / ".last.pt.123.deadbeef.tmp", tmp_path / ".metrics.jsonl.77.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".lock"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_training_resumes_from_the_previous_checkpoint(make_text_corpus, tmp_path, caplog):
    corpus = make_text_corpus()
    train(make_cfg(corpus, tmp_path, "full"), quiet=True)
    cfg = make_cfg(corpus, tmp_path, "broken", max_steps=8)
    train(cfg, quiet=True)  # last.pt at step 8, last.prev.pt at step 4
    run_dir = tmp_path / "broken"
    (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:-50])
    with caplog.at_level(logging.WARNING):
        results = train(with_train(cfg, max_steps=12), resume=True, quiet=True)
    assert f"skipping checkpoint {run_dir / 'last.pt'}" in caplog.text
    assert "falling back" in caplog.text
    assert results["step"] == 12
    assert_same_run_state(tmp_path / "full" / "last.pt", run_dir / "last.pt")
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(tmp_path / "full"))


def test_disk_full_during_training(make_text_corpus, tmp_path, monkeypatch, capsys):
    corpus = make_text_corpus()
    train(make_cfg(corpus, tmp_path, "full"), quiet=True)
    real, saves = checkpoint_module._create_new, {"n": 0}

    def fill_up(tmp: Path) -> Any:
        saves["n"] += 1  # best.pt and last.pt at step 4, then the disk is full
        return _FlakyFile(real(tmp), room=0 if saves["n"] > 2 else None)

    monkeypatch.setattr(checkpoint_module, "_create_new", fill_up)
    args = ["train", *overrides(corpus), "--name", "full-disk", "--out-dir", str(tmp_path)]
    assert main([*args, "--quiet"]) == 1
    message = capsys.readouterr().err
    assert "could not save checkpoint" in message, message
    assert "No space left on device" in message and "unchanged" in message, message
    run_dir = tmp_path / "full-disk"
    assert load_checkpoint(run_dir / "last.pt")["counters"]["step"] == 4  # intact
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(checkpoint_module, "_create_new", real)  # space freed
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert_same_run_state(tmp_path / "full" / "last.pt", run_dir / "last.pt")


# --------------------------------------------------------------------------- one run per folder


def test_second_run_in_the_same_folder_refuses(make_text_corpus, tmp_path):
    cfg = make_cfg(make_text_corpus(), tmp_path, max_steps=4)
    run_dir = tmp_path / "run"
    with RunLock(run_dir) as lock:
        assert lock.locked
        message = rf"'{run_dir}' is in use by another moglstm process \(pid {os.getpid()} "
        with pytest.raises(RunLockedError, match=message):
            train(cfg, quiet=True)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    assert not lock.locked
    assert train(cfg, quiet=True)["step"] == 4
    with RunLock(run_dir), pytest.raises(RunLockedError):
        train(with_train(cfg, max_steps=6), resume=True, quiet=True)


def test_lock_held_by_another_process_until_it_is_killed(make_text_corpus, tmp_path, capsys):
    corpus, run_dir = make_text_corpus(), tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moglstm.lm.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", *overrides(corpus, max_steps=2), "--out-dir", str(tmp_path), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"is in use by another moglstm process (pid {holder.pid} on" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a dead process
        holder.wait()
        holder.stdout.close()
    assert main(args) == 0


def test_deleting_the_lock_file_lets_no_second_writer_in(make_text_corpus, tmp_path, capsys):
    """The lock is on the folder itself: deleting (or replacing) ``.lock`` changes nothing,
    and the refusal still names the holder's pid and start time (from /proc/locks)."""
    corpus, run_dir = make_text_corpus(), tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from moglstm.lm.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(300)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (run_dir / ".lock").unlink()
        args = ["train", *overrides(corpus, max_steps=2), "--out-dir", str(tmp_path), "--quiet"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"is in use by another moglstm process (pid {holder.pid}, since " in err, err
        (run_dir / ".lock").write_text("")  # an emptied lock file, as a released one is
        assert main(args) == 2
        assert f"(pid {holder.pid}" in capsys.readouterr().err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()


def test_a_folder_replaced_under_a_run_is_never_written(make_text_corpus, tmp_path):
    cfg = make_cfg(make_text_corpus(), tmp_path, max_steps=8)
    run_dir = tmp_path / "run"

    def swap(step: int, _: Any) -> None:
        if step == 2:
            run_dir.rename(tmp_path / "moved")
            run_dir.mkdir()  # another run's folder, say

    with pytest.raises(RunFolderChangedError, match="removed or replaced"):
        train(with_train(cfg, eval_every=4, log_every=1), quiet=True, on_step=swap)
    assert list(run_dir.iterdir()) == [], list(run_dir.iterdir())  # nothing of the first run


def test_run_lock_api(tmp_path):
    lock = RunLock(tmp_path / "a" / "b")
    assert lock.acquire() is lock and lock.acquire() is lock  # re-entrant for its holder
    assert (tmp_path / "a" / "b" / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert "locked=True" in repr(lock)
    lock.release()
    lock.release()
    assert (tmp_path / "a" / "b" / ".lock").read_text() == ""
    with pytest.raises(TypeError, match="run_dir"):
        RunLock(3)


# --------------------------------------------------------------------------- non-finite losses


def test_nonfinite_stop(make_text_corpus, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, {7})
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="stop")
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at step 7; stopping.*step 4"):
        train(cfg, quiet=True)


def test_nonfinite_skip_drops_the_step(make_text_corpus, tmp_path, monkeypatch, caplog):
    poison_training_loss(monkeypatch, {7})
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="skip")
    with caplog.at_level(logging.WARNING):
        results = train(cfg, quiet=True)
    assert "non-finite training loss (nan) at step 7: step skipped" in caplog.text
    assert (results["step"], results["skipped_steps"], results["rollbacks"]) == (12, 1, 0)
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in payload["model"].values())
    adam_steps = {float(s["step"]) for s in payload["optimizer"]["state"].values()}
    assert adam_steps == {11.0}  # 12 steps, one without an update
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


def test_nonfinite_skip_gives_up_after_max_nonfinite(make_text_corpus, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, Always(6))
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="skip", max_nonfinite=2)
    with pytest.raises(NonFiniteLossError, match=r"at step 8: 3 since the last checkpoint"):
        train(cfg, quiet=True)


def test_nonfinite_rollback_lowers_the_rate(make_text_corpus, tmp_path, monkeypatch, caplog):
    poison_training_loss(monkeypatch, {7})
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="rollback", schedule="constant")
    with caplog.at_level(logging.WARNING):
        results = train(cfg, quiet=True)
    assert "at step 7: rolled back to step 4, learning rate now 0.005" in caplog.text
    assert (results["step"], results["rollbacks"], results["skipped_steps"]) == (12, 1, 0)
    records = read_metrics(tmp_path / "run")
    assert_no_doubled_lines(tmp_path / "run")
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert {r["lr"] for r in records if r["step"] <= 4} == {0.01}
    assert {r["lr"] for r in records if r["step"] > 4} == {0.005}
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["counters"]["rollbacks"] == 1 and payload["scheduler"]["lr"] == 0.005


def test_nonfinite_rollback_before_any_validation(make_text_corpus, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, {2})
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="rollback", rollback_lr_factor=0.1)
    results = train(cfg, quiet=True)  # goes back to the checkpoint taken at step 0
    assert (results["step"], results["rollbacks"]) == (12, 1)
    rates = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert rates[0] == pytest.approx(0.001) and max(rates) == rates[0]


def test_nonfinite_rollback_gives_up(make_text_corpus, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, Always(6))
    cfg = make_cfg(make_text_corpus(), tmp_path, nonfinite="rollback", max_nonfinite=3)
    with pytest.raises(NonFiniteLossError, match="more than train.max_nonfinite=3"):
        train(cfg, quiet=True)
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["counters"]["step"] == 4  # the last good checkpoint is kept


def test_nonfinite_settings_are_checked_and_resumable(make_text_corpus, tmp_path):
    cfg = make_cfg(make_text_corpus(), tmp_path, max_steps=4)
    for change, message in (
        ({"nonfinite": "ignore"}, "train.nonfinite='ignore' is not one of: stop, skip, rollback"),
        ({"rollback_lr_factor": 0.0}, r"train.rollback_lr_factor=0.0 must be in \(0, 1\]"),
        ({"max_nonfinite": 0}, "train.max_nonfinite=0 must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            validate(with_train(cfg, **change))
    train(cfg, quiet=True)
    resumed = with_train(cfg, max_steps=6, nonfinite="skip", max_nonfinite=9)
    assert train(resumed, resume=True, quiet=True)["step"] == 6


def test_default_policy_is_stop():
    assert TrainConfig().nonfinite == "stop"
    assert RunConfig(data=DataConfig(), model=ModelConfig()).train.max_nonfinite == 5
