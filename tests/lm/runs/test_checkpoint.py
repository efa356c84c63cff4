"""Tests for moglstm.lm.runs.checkpoint: atomic saves, safe loads and RNG state."""

from __future__ import annotations

import errno
import os
import random
import sys

import pytest
import torch

from moglstm.lm.config import RunConfig, from_dict, to_dict
from moglstm.lm.runs import checkpoint as ckpt_module
from moglstm.lm.runs.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from moglstm.lm.runtime import capture_rng_state, restore_rng_state


def make_payload(step: int = 3) -> dict:
    """A payload shaped like the training loop's, from a tiny model after `step` Adam steps."""
    torch.manual_seed(0)
    model = torch.nn.LSTM(4, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    for _ in range(step):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 4))[0].sum().backward()
        optimizer.step()
    scheduler.step(1.0)
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": to_dict(RunConfig(name="test")),
        "counters": {"step": step, "epoch": 1, "best_valid_loss": 4.5, "bad_validations": 0},
        "data": {"position": 70, "epoch": 1, "generator": torch.Generator().get_state()},
        "rng": capture_rng_state(),
        "vocab": {"itos": ["<eos>", "<unk>", "a"], "level": "word"},
    }


def assert_same(a, b) -> None:
    """Deep equality for nested dicts/lists/tuples holding tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN-safe


# --------------------------------------------------------------------------- round trip


def test_round_trip(tmp_path):
    payload = make_payload()
    path = save_checkpoint(tmp_path / "last.pt", payload)
    assert path == tmp_path / "last.pt"
    loaded = load_checkpoint(path)
    assert loaded["format_version"] == FORMAT_VERSION
    assert_same({k: v for k, v in loaded.items() if k != "format_version"}, payload)
    assert from_dict(loaded["config"]) == RunConfig(name="test")
    assert "format_version" not in payload  # the caller's dict is not modified


def test_plain_weights_only_load_and_restore_into_fresh_objects(tmp_path):
    payload = make_payload()
    save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # what any tool can do
    model = torch.nn.LSTM(4, 5)
    model.load_state_dict(raw["model"])
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.load_state_dict(raw["optimizer"])
    assert optimizer.param_groups[0]["betas"] == (0.0, 0.999)
    assert_same(model.state_dict(), payload["model"])


def test_save_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "ckpt.pt"
    save_checkpoint(path, {"counters": {"step": 1}})
    save_checkpoint(path, {"counters": {"step": 2}})
    assert load_checkpoint(path)["counters"]["step"] == 2
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_save_accepts_str_path_and_map_location(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"w": torch.ones(2)})
    assert load_checkpoint(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"
    assert load_checkpoint(path, map_location=None)["w"].sum().item() == 2


class NotPlain:
    pass


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"a": {"b": [1, NotPlain()]}}, "payload['a']['b'][1]"),
        ({"vocab": range(3)}, "payload['vocab']"),
        ({"config": RunConfig()}, "payload['config']"),
        ({"s": {1, 2}}, "payload['s']"),
    ],
)
def test_save_rejects_non_plain_data_before_writing(tmp_path, payload, where):
    with pytest.raises(TypeError) as info:
        save_checkpoint(tmp_path / "c.pt", payload)
    assert where in str(info.value)
    assert os.listdir(tmp_path) == []


def test_save_checks_arguments(tmp_path):
    with pytest.raises(TypeError, match="payload"):
        save_checkpoint(tmp_path / "c.pt", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format_version"):
        save_checkpoint(tmp_path / "c.pt", {"format_version": FORMAT_VERSION + 1})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomicity


def fail_mid_write(obj, f, *args, **kwargs):
    """Stands in for torch.save on a full disk: some bytes land, then ENOSPC."""
    f.write(b"PK\x03\x04 partial checkpoint bytes" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"counters": {"step": 1}, "w": torch.arange(5)})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", fail_mid_write)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"counters": {"step": 2}, "w": torch.zeros(5)})
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    assert path.read_bytes() == before
    assert load_checkpoint(path)["counters"]["step"] == 1


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", fail_mid_write)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_failed_rename_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def no_replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt_module.os, "replace", no_replace)
    with pytest.raises(PermissionError, match="last.pt"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 1


def test_interrupt_mid_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last.pt", {"step": 1})
    assert os.listdir(tmp_path) == []


def test_write_is_fsynced_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        ckpt_module.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd)
    )
    monkeypatch.setattr(
        ckpt_module.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b)
    )
    save_checkpoint(tmp_path / "c.pt", {"step": 1})
    assert events[:2] == ["fsync", "replace"]
    if os.name == "posix":
        assert events == ["fsync", "replace", "fsync"]  # the folder too


# --------------------------------------------------------------------------- bad files


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(IsADirectoryError, match=str(tmp_path.name)):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.99])
def test_truncated_file_is_named(tmp_path, keep):
    path = tmp_path / "cut.pt"
    save_checkpoint(path, make_payload(step=1))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello\n")
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_checkpoint(path)


def test_foreign_torch_files_are_rejected(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="weights.pt.*not a moglstm checkpoint"):
        load_checkpoint(path)
    torch.save({"model": NotPlain()}, path)  # would need pickled code to load
    with pytest.raises(CheckpointError, match="weights.pt.*plain data"):
        load_checkpoint(path)
    torch.save({"format_version": FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="weights.pt.*format 2"):
        load_checkpoint(path)
    torch.save({"format_version": "1"}, path)
    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- RNG state


def draw() -> tuple:
    return (torch.rand(5), torch.randint(0, 100, (3,)), random.random(), random.gauss(0, 1))


def assert_draws_equal(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2:] == b[2:]


def test_rng_restore_reproduces_draws():
    torch.manual_seed(123)
    random.seed(123)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    state = capture_rng_state()
    first = draw()
    draw()  # move every generator on
    restore_rng_state(state)
    assert_draws_equal(draw(), first)


def test_rng_state_is_plain_and_survives_a_checkpoint(tmp_path):
    state = capture_rng_state()
    assert isinstance(state["python"]["state"], list)
    assert all(type(x) is int for x in state["python"]["state"])
    first = draw()
    save_checkpoint(tmp_path / "c.pt", {"rng": state})
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert_draws_equal(draw(), first)


def test_rng_restore_validates():
    with pytest.raises(TypeError, match="state"):
        restore_rng_state([1, 2])  # type: ignore[arg-type]
    good = capture_rng_state()
    with pytest.raises(ValueError, match="'torch'"):
        restore_rng_state({k: v for k, v in good.items() if k != "torch"})
    with pytest.raises(ValueError, match="'torch'"):
        restore_rng_state({**good, "torch": [1, 2, 3]})
    with pytest.raises(ValueError, match="'python'"):
        restore_rng_state({**good, "python": {"version": 3}})


def test_numpy_state_round_trip(tmp_path):
    np = pytest.importorskip("numpy")  # optional: captured only when installed
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached gaussian
    state = capture_rng_state()
    assert isinstance(state["numpy"]["key"], list)
    first = np.random.rand(4)
    save_checkpoint(tmp_path / "c.pt", {"rng": state})
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert np.array_equal(np.random.rand(4), first)
    with pytest.raises(ValueError, match="'numpy'"):
        restore_rng_state({**state, "numpy": {"kind": "MT19937"}})


def test_without_numpy_the_state_has_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` fail
    state = capture_rng_state()
    assert state["numpy"] is None
    restore_rng_state(state)
    with pytest.warns(UserWarning, match="NumPy is not installed"):
        restore_rng_state({**state, "numpy": {"kind": "MT19937", "key": [0] * 624}})


def test_cuda_states_are_captured_and_restored_when_present(monkeypatch):
    """Fakes two CUDA devices so the CUDA branch runs on any machine."""
    fake = {0: torch.full((16,), 1, dtype=torch.uint8), 1: torch.full((16,), 2, dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [fake[0], fake[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.__setitem__(d, s))
    state = capture_rng_state()
    assert [t.tolist() for t in state["cuda"]] == [fake[0].tolist(), fake[1].tolist()]
    restore_rng_state(state)
    assert torch.equal(restored[0], fake[0]) and torch.equal(restored[1], fake[1])
    # Resumed with one device: restore what fits and say so.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    restored.clear()
    with pytest.warns(UserWarning, match="2 device"):
        restore_rng_state(state)
    assert list(restored) == [0]


def test_gpu_checkpoint_resumes_on_cpu_with_a_warning():
    state = {**capture_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)]}
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        pytest.skip("this machine has exactly one CUDA device: nothing to warn about")
    with pytest.warns(UserWarning, match="CUDA RNG states for 1 device"):
        restore_rng_state(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_rng_round_trip():
    state = capture_rng_state()
    first = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), first)
