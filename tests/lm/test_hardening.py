"""Hardening (issue 11): hostile configs and run folders, checkpoints that always exist
and are checked before use, models that must fit before they are built, peers that
never hang a run. Each test is one row of the table in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from moglstm.cli import main
from moglstm.lm import budget
from moglstm.lm.config import load_config, load_preset
from moglstm.lm.evaluate import evaluate
from moglstm.lm.generate import generate, sample_next
from moglstm.lm.runs import payload as payload_module
from moglstm.lm.runs.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_newest_checkpoint,
    previous_path,
    save_checkpoint,
)
from moglstm.lm.runs.payload import check_training_checkpoint
from moglstm.lm.safety import UnsafePathError, check_tree_size, load_yaml, short_repr
from moglstm.lm.train import train
from tests.conftest import write_text_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = 1500  # characters: every error here must fit in this, whatever its input


def bomb(levels: int = 9, width: int = 9) -> list:
    """``width ** levels`` elements built from shared references: a few bytes pickled."""
    value: list = ["x"] * width
    for _ in range(levels - 1):
        value = [value] * width
    return value


def yaml_bomb(levels: int = 9) -> str:
    """The 'billion laughs' in YAML: each line aliases the one before nine times."""
    names = [chr(ord("a") + i) for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + f"\nname: *{names[-1]}\n"


def _error(capsys: pytest.CaptureFixture, argv: list[str], code: int = 2) -> str:
    start = time.perf_counter()
    assert main(argv) == code, argv
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - start < 20, argv
    assert len(err) <= SHORT and len(err.splitlines()) == 1, err  # one line, not a traceback
    return err


def _cfg_overrides(corpus: Path, out: Path, name: str = "run", **train: Any) -> list[str]:
    settings = {"max_steps": 4, "eval_every": 2, "log_every": 2, "device": "cpu", **train}
    return [
        "data.corpus=text",
        f"data.path={corpus}",
        "data.batch_size=2",
        "data.bptt=8",
        "model.kind=lstm",
        "model.hidden_size=8",
        "model.num_layers=1",
        f"name={name}",
        f"out_dir={out}",
        "train.eval_max_tokens=60",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny finished run (last.pt, last.prev.pt, best.pt) and its corpus."""
    base = tmp_path_factory.mktemp("hardening")
    corpus = write_text_corpus(base / "corpus", n_train=60, n_valid=20, n_test=20)
    train(load_config(None, _cfg_overrides(corpus, base / "runs")), quiet=True)
    return {"run": base / "runs" / "run", "corpus": corpus}


@pytest.fixture
def run_copy(trained: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(trained["run"], copy, symlinks=True)
    return copy


def _resume_argv(run: Path, *extra: str) -> list[str]:
    return ["train", "--resume", str(run), "--quiet", *extra]


# --------------------------------------------------------------------------- bounded messages


def test_short_repr_is_bounded_in_size_and_time():
    start = time.perf_counter()
    shown = short_repr(bomb())  # 9**9 elements, if it were walked
    assert time.perf_counter() - start < 0.1
    assert len(shown) <= 120 and shown.startswith("[[")
    assert short_repr(10**100_000) == "<an int of 332193 bits>"
    assert len(short_repr("a" * 10**6)) <= 120

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert short_repr(Broken()).startswith("<Broken")  # a broken __repr__ hides nothing


def test_tree_size_counts_shared_references():
    check_tree_size({"a": [1, 2, 3]}, "cfg")
    with pytest.raises(ValueError, match="more than 100,000 values"):
        check_tree_size(bomb(), "cfg")
    deep: list = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match="nests deeper"):
        check_tree_size(deep, "cfg")


def test_alias_bomb_in_a_preset_is_refused_quickly_in_little_memory(tmp_path, capsys):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(yaml_bomb())
    assert preset.stat().st_size < 400  # a few hundred bytes
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="aliases"):
            load_config(preset)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20
    err = _error(capsys, ["train", "--preset", str(preset), "--print-config"])
    assert "aliases" in err and "line 2" in err


def test_alias_bomb_in_an_override_is_refused(capsys):
    value = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], *a, *a, *a, *a, *a, *a, *a, *a]"
    with pytest.raises(ValueError, match="aliases"):
        load_config(None, [f"train.betas={value}"])
    err = _error(capsys, ["train", "--print-config", f"train.betas={value}"])
    assert "train.betas" in err and "aliases" in err


def test_a_shared_reference_bomb_in_a_checkpoint_config_ends_quickly(run_copy, capsys):
    payload = load_checkpoint(run_copy / "last.pt")
    payload["config"]["name"] = bomb()
    for name in ("last.pt", "best.pt", "last.prev.pt", "best.prev.pt"):
        torch.save(payload, run_copy / name)  # as an attacker would: a few hundred bytes more
    assert (run_copy / "last.pt").stat().st_size < 2 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="too large to be a config"):
            check_training_checkpoint(load_checkpoint(run_copy / "best.pt"), run_copy / "best.pt")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20
    for argv in (
        ["evaluate", str(run_copy)],
        ["generate", str(run_copy), "--prompt", "the"],
        _resume_argv(run_copy),
    ):
        err = _error(capsys, argv)
        assert "too large to be a config" in err and str(run_copy) in err, err


def test_malformed_values_in_a_config_are_shortened(tmp_path, capsys):
    preset = tmp_path / "long.yaml"
    preset.write_text("train:\n  lr: [" + ", ".join(["[1, 2, 3]"] * 5000) + "]\n")
    err = _error(capsys, ["train", "--preset", str(preset), "--print-config"])
    assert "train.lr: expected a float" in err


def test_out_of_range_integers_name_the_key(capsys):
    for item in ("train.seed=18446744073709551616", f"train.seed={2**64}"):
        err = _error(capsys, ["train", "--print-config", item])
        assert "train.seed" in err and "64 bits" in err
    err = _error(capsys, ["train", "--print-config", "train.seed=" + "9" * 5000])
    assert "train.seed" in err


# --------------------------------------------------------------------------- file contents


def test_preset_errors_never_echo_the_file(tmp_path, capsys):
    secret = "hunter2-" + "s3cr3t"
    cases = {
        "not-a-config.yaml": f"{secret}: 1\nuser: {secret}\n",  # a mapping, but no config key
        "broken.yaml": f"{secret}: [\n  {secret}\n",  # a syntax error
        "plain.txt": f"root:{secret}:0:0:root:/root:/bin/bash\n",  # like /etc/shadow
        "binary.yaml": b"\xff\xfe" + secret.encode(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        err = _error(capsys, ["train", "--preset", str(path), "--print-config"])
        assert secret not in err, (name, err)
        assert str(path) in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("modle:\n  hidden_size: 3\n")  # a near miss of a config key is named
    err = _error(capsys, ["train", "--preset", str(typo), "--print-config"])
    assert "'modle'" in err and "did you mean 'model'" in err


def test_a_folder_or_fifo_as_a_preset_or_corpus_is_called_what_it_is(
    tmp_path, trained, capsys
):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    err = _error(capsys, ["train", "--preset", str(fifo), "--print-config"])
    assert "FIFO" in err
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert "is a folder" in _error(capsys, ["train", "--preset", str(folder), "--print-config"])
    corpus = trained["corpus"]
    for bad, word in ((fifo, "FIFO"), (folder, "folder")):
        argv = [
            "train",
            "--quiet",
            *_cfg_overrides(corpus, tmp_path / "runs", name=f"bad-{word}"),
            "data.path=null",
            f"data.train_path={bad}",
            f"data.valid_path={corpus / 'valid.txt'}",
            f"data.test_path={corpus / 'test.txt'}",
        ]
        err = _error(capsys, argv)
        assert f"corpus file {bad}" in err and word in err and "missing" not in err


def test_refusing_a_malicious_checkpoint_says_why_in_our_words(tmp_path, capsys):
    class Payload:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(tmp_path / "pwned"),))

    torch.save({"format_version": 1, "model": Payload()}, tmp_path / "evil.pt")
    err = _error(capsys, ["evaluate", str(tmp_path / "evil.pt")])
    assert "asks to import and call" in err and "mkdir" in err and "never needs" in err
    assert "weights_only" not in err and "add_safe_globals" not in err
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- run folders


def test_a_planted_lock_link_is_refused_and_its_target_untouched(run_copy, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_copy / ".lock").unlink(missing_ok=True)
    (run_copy / ".lock").symlink_to(victim)
    err = _error(capsys, _resume_argv(run_copy, "train.max_steps=6"))
    assert ".lock" in err and "symbolic link" in err
    assert victim.read_text() == "precious\n"


def test_planted_config_and_checkpoint_links_are_replaced_not_followed(
    run_copy, tmp_path, caplog
):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("config.yaml", "last.pt"):
        target = outside / name
        shutil.copy(run_copy / name, target)
        (run_copy / name).unlink()
        (run_copy / name).symlink_to(target)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(_resume_argv(run_copy, "train.max_steps=6")) == 0
    # last.pt was a link: not read (the previous checkpoint was), then replaced
    assert "symbolic link" in caplog.text and "falling back" in caplog.text
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    for name in ("config.yaml", "last.pt"):
        assert not (run_copy / name).is_symlink() and (run_copy / name).is_file()
    assert load_checkpoint(run_copy / "last.pt")["counters"]["step"] == 6


def test_a_planted_metrics_link_is_refused(run_copy, tmp_path, capsys):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("precious\n")
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(victim)
    err = _error(capsys, _resume_argv(run_copy, "train.max_steps=6"))
    assert "metrics.jsonl" in err and "symbolic link" in err
    assert victim.read_text() == "precious\n"


def test_a_planted_fifo_never_blocks(run_copy, capsys):
    (run_copy / ".lock").unlink(missing_ok=True)
    os.mkfifo(run_copy / ".lock")
    err = _error(capsys, _resume_argv(run_copy, "train.max_steps=6"))
    assert "FIFO" in err


# --------------------------------------------------------------------------- checkpoints exist


def _payload(n: int) -> dict[str, Any]:
    return {"weights": torch.full((64,), float(n)), "n": n}


def test_last_pt_exists_at_every_step_of_a_save(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    seen = []
    real_replace, real_link = os.replace, os.link

    def replace(src: Any, dst: Any) -> None:
        seen.append(path.is_file())
        real_replace(src, dst)
        seen.append(path.is_file())

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        seen.append(path.is_file())
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    for n in range(2, 5):
        save_checkpoint(path, _payload(n), keep_previous=True)
        assert load_checkpoint(path)["n"] == n
        assert load_checkpoint(previous_path(path))["n"] == n - 1
    assert seen and all(seen)


def test_a_reader_beside_the_saves_always_finds_last_pt(tmp_path):
    import threading

    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(0), keep_previous=True)
    misses, reads, done = [], [0], threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                with open(path, "rb") as f:
                    f.read(16)
                reads[0] += 1
            except FileNotFoundError:
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 40):
            save_checkpoint(path, _payload(n), keep_previous=True, verify=False)
    finally:
        done.set()
        thread.join()
    assert reads[0] > 0 and not misses


def test_previous_copy_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "best.pt"
    save_checkpoint(path, _payload(1), keep_previous=True)
    save_checkpoint(path, _payload(2), keep_previous=True)
    assert load_checkpoint(previous_path(path))["n"] == 1
    assert not (previous_path(path)).is_symlink()


def test_best_pt_falls_back_to_its_previous_copy(run_copy, caplog):
    best = run_copy / "best.pt"
    payload = load_checkpoint(best)
    save_checkpoint(best, payload, keep_previous=True)  # best.prev.pt: the same, verified
    assert previous_path(best).is_file()
    best.write_bytes(best.read_bytes()[:1000])  # damaged
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        first = evaluate(run_copy, "valid", device="cpu", max_tokens=50)
        second = evaluate(run_copy, "valid", device="cpu", max_tokens=50)
    assert first["checkpoint"].endswith("best.prev.pt") and first["loss"] == second["loss"]
    skipped = [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1  # fallback warnings are given once


def test_unreadable_best_names_checkpoint_last(run_copy, capsys):
    (run_copy / "best.pt").write_bytes(b"not a checkpoint")
    (run_copy / "best.prev.pt").unlink(missing_ok=True)
    for argv in (["evaluate", str(run_copy)], ["generate", str(run_copy), "--prompt", "the"]):
        err = _error(capsys, argv)
        assert "best.pt" in err and "--checkpoint last" in err
    (run_copy / "best.pt").unlink()
    assert "--checkpoint last" in _error(capsys, ["evaluate", str(run_copy)])
    assert main(["evaluate", str(run_copy), "--checkpoint", "last", "--max-tokens", "50"]) == 0


# --------------------------------------------------------------------------- consistency


def _rewrite(path: Path, change: Any) -> None:
    payload = load_checkpoint(path)
    change(payload)
    path.unlink()
    save_checkpoint(path, payload)


def _huge(payload: dict) -> None:
    payload["config"]["model"]["hidden_size"] = 200_000


def _no_model(payload: dict) -> None:
    del payload["model"]


def _nan(payload: dict) -> None:
    next(t for t in payload["model"].values() if t.is_floating_point()).fill_(float("nan"))


def _shape(payload: dict) -> None:
    key = next(iter(payload["model"]))
    payload["model"][key] = torch.zeros(3, 3)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (_huge, "has shape"),
        (_no_model, "lacks model"),
        (_nan, "NaN"),
        (_shape, "has shape (3, 3)"),
    ],
)
def test_inconsistent_checkpoints_are_one_line_naming_the_file(run_copy, capsys, change, fragment):
    for name in ("best.pt", "best.prev.pt", "last.pt", "last.prev.pt"):
        if (run_copy / name).exists():
            _rewrite(run_copy / name, change)
    tracemalloc.start()
    try:
        for argv in (
            ["evaluate", str(run_copy)],
            ["generate", str(run_copy), "--prompt", "the"],
            _resume_argv(run_copy),
        ):
            err = _error(capsys, argv)
            assert fragment in err and str(run_copy) in err, err
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20  # the 200000-wide model (600 GB) was never built


def test_resume_falls_back_past_an_inconsistent_last_pt(run_copy, caplog):
    _rewrite(run_copy / "last.pt", _shape)
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(_resume_argv(run_copy, "train.max_steps=6")) == 0
    skipped = [r for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "has shape (3, 3)" in skipped[0].getMessage()
    assert load_checkpoint(run_copy / "last.pt")["counters"]["step"] == 6


def test_optimizer_state_is_checked_on_resume(run_copy):
    payload = load_checkpoint(run_copy / "last.pt")
    check_training_checkpoint(payload, run_copy / "last.pt", resume=True)
    state = payload["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="exp_avg.*has shape"):
        check_training_checkpoint(payload, run_copy / "last.pt", resume=True)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_newest_checkpoint(
            run_copy / "best.pt",
            check=lambda p, f: check_training_checkpoint(payload, f, resume=True),
        )


# --------------------------------------------------------------------------- memory


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(trained, tmp_path, capsys):
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path, name="big")]
    start = time.perf_counter()
    err = _error(capsys, [*argv, "model.hidden_size=2000000"])
    assert time.perf_counter() - start < 20
    assert "needs about" in err and "available" in err and "parameters" in err
    assert "train.check_memory=false" in err and "model.hidden_size" in err
    err = _error(capsys, [*argv, "model.hidden_size=1000000000"])
    assert "too large to build at all" in err
    err = _error(capsys, [*argv, "model.num_params=1e40"])
    assert "model.num_params" in err and "largest model considered" in err
    assert not (tmp_path / "big" / "last.pt").exists()


def test_memory_check_uses_the_numbers_and_can_be_switched_off(trained, tmp_path, monkeypatch):
    cfg = load_config(None, _cfg_overrides(trained["corpus"], tmp_path))
    estimate = budget.check_training_fits(cfg, 100, torch.device("cpu"))
    assert estimate.parameters > 0 and estimate.total > estimate.state > 0
    monkeypatch.setattr(budget, "available_memory", lambda device: (1000, "this machine has"))
    with pytest.raises(budget.MemoryBudgetError, match=r"1\.0 kB available"):
        budget.check_training_fits(cfg, 100, torch.device("cpu"))
    off = load_config(
        None, [*_cfg_overrides(trained["corpus"], tmp_path), "train.check_memory=false"]
    )
    budget.check_training_fits(off, 100, torch.device("cpu"))
    assert train(off, quiet=True)["step"] == 4


def test_available_memory_is_known_on_this_platform():
    room = budget.available_memory(torch.device("cpu"))
    assert room is None or room[0] > 0


def test_on_a_gpu_the_chosen_devices_free_memory_counts(trained, tmp_path, monkeypatch):
    seen = []

    def mem_get_info(device: Any) -> tuple[int, int]:
        seen.append(device)
        return 5_000_000, 80_000_000_000

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu = torch.device("cuda", 1)
    assert budget.available_memory(gpu) == (5_000_000, "GPU cuda:1 has")
    cfg = load_config(None, _cfg_overrides(trained["corpus"], tmp_path))
    with pytest.raises(budget.MemoryBudgetError, match=r"GPU cuda:1 has 5\.0 MB available"):
        budget.check_training_fits(cfg, 100_000, gpu)
    assert seen == [gpu, gpu]


def test_an_allocation_failure_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from moglstm.lm import train as train_module

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 1600000000000 bytes. Error code 12"
        )

    monkeypatch.setattr(train_module, "build_model", fail)
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path, name="oom")]
    err = _error(capsys, argv, code=1)
    assert "out of memory" in err and "data.batch_size" in err


# --------------------------------------------------------------------------- runs and flags


def test_a_run_without_a_checkpoint_restarts_cleanly(trained, tmp_path, capsys, caplog):
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path, name="early")]
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text("name: early\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    err = _error(capsys, _resume_argv(run))
    assert "no last.pt" in err and "without --resume" in err
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(argv) == 0
    assert "starting it over" in caplog.text
    assert (run / "last.pt").is_file()
    assert "step" in (run / "metrics.jsonl").read_text().splitlines()[0]


def test_preset_with_resume_must_describe_the_run(trained, run_copy, tmp_path, capsys):
    same = [
        *(o for o in _cfg_overrides(trained["corpus"], tmp_path) if o[:4] not in ("name", "out_")),
        "train.max_steps=6",
    ]
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  lr: 0.5\n")
    err = _error(capsys, ["train", "--preset", str(other), "--resume", str(run_copy), *same])
    assert "--preset" in err and "train.lr" in err
    err = _error(capsys, ["train", "--preset", "ptb-small", "--resume", str(run_copy)])
    assert "--preset" in err and "data.corpus" in err
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  max_steps: 4\n")
    argv = ["train", "--preset", str(mine), "--resume", str(run_copy), "--quiet", *same]
    assert main(argv) == 0


def test_tiny_temperatures_sample_like_greedy(run_copy):
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0 - 1e-6])
    for t in (1e-39, 1e-300, 5e-324):
        assert sample_next(logits, temperature=t) == 1
    greedy = generate(run_copy, "the", 8, greedy=True, device="cpu")["tokens"]
    assert generate(run_copy, "the", 8, temperature=1e-39, seed=1, device="cpu")["tokens"] == greedy


def test_generate_command_with_a_tiny_temperature(run_copy, capsys):
    assert main(["generate", str(run_copy), "--prompt", "the", "--temperature", "1e-39"]) == 0
    assert capsys.readouterr().out.strip()


def test_yaml_helpers_refuse_long_and_odd_input():
    with pytest.raises(ValueError, match="too long"):
        load_yaml("a: 1\n" * 300_000, "preset x")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml("a: " + "1" * 5000, "preset x")
    assert load_yaml("a: &x 1\nb: 2\n", "preset x") == {"a": 1, "b": 2}  # anchors alone are fine


def test_shipped_presets_still_load():
    from moglstm.lm.config import list_presets

    for name in list_presets():
        load_preset(name)


def test_unsafe_path_error_is_a_value_error():
    assert issubclass(UnsafePathError, ValueError)
    assert payload_module.TRAINING_ENTRIES[:3] == ("model", "config", "vocab")


# --------------------------------------------------------------------------- distributed

_PEER_SCRIPT = """
import os, sys, time
from moglstm.lm import distributed
mode, timeout = sys.argv[1], float(sys.argv[2])
try:
    with distributed.session("cpu", timeout) as ctx, distributed.peer_failures(ctx):
        distributed.barrier(ctx)  # both are up
        if ctx.rank == 1:
            if mode == "die":
                os._exit(0)
            time.sleep(120)  # stalled, not dead
        distributed.barrier(ctx)
except distributed.PeerLostError as exc:
    print(exc, file=sys.stderr, flush=True)
    os._exit(3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "stall"])
def test_a_dead_or_stalled_peer_is_one_line_within_the_timeout(mode, free_port, tmp_path):
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[2] / "src"
    processes = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port),
        }
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
        processes.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", _PEER_SCRIPT, mode, "3"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    try:
        start = time.perf_counter()
        code = processes[0][0].wait(timeout=90)
        elapsed = time.perf_counter() - start
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    err = (tmp_path / "rank0.log").read_text().strip()
    assert code == 3, err
    assert len(err.splitlines()) == 1, err
    assert "another process of this job died or stopped answering" in err
    assert "train.dist_timeout" in err and "pair.cc" not in err
    assert elapsed < 60


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    import datetime

    from moglstm.lm import distributed

    seen: dict[str, Any] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    with distributed.session("cpu", 42.0) as ctx:
        assert ctx.world_size == 2
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert load_config().train.dist_timeout == 300.0
    with pytest.raises(ValueError, match="train.dist_timeout"):
        load_config(None, ["train.dist_timeout=0"])


# --------------------------------------------------------------------------- the tables


def test_every_test_the_reliability_tables_name_exists():
    """docs/reliability.md and the README's table name tests that exist."""
    import fnmatch
    import re

    root = Path(__file__).resolve().parents[2]
    defined = {
        path.name: set(re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M))
        for path in (root / "tests" / "lm").glob("test_*.py")
    }
    doc = (root / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", doc)
    assert len(named) > 25
    for file, test in named:
        assert test in defined[file], f"{file}::{test}"
    readme = (root / "README.md").read_text()
    table = readme[readme.index("### Reliability") :].split("\n\n")[2]
    for pattern in re.findall(r"`(test_[\w*]+)`", table):
        assert fnmatch.filter(defined["test_hardening.py"], pattern), pattern


# --------------------------------------------------------------------------- later doors (audit)


def test_tune_space_files_are_read_like_configs(tmp_path, capsys):
    """Search-space files: no aliases, a size cap, errors that never quote the file."""
    from moglstm.lm.tune import load_space

    space = tmp_path / "space.yaml"
    space.write_text("space: {train.lr: &a [1, 2], train.seed: *a}\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        load_space(space)
    assert time.perf_counter() - start < 1
    space.write_text("space:\n  hunter2secret: [\n")
    err = _error(capsys, ["tune", str(space), "--trials", "1", "--out-dir", str(tmp_path)])
    assert "not valid YAML" in err and "line" in err and "hunter2secret" not in err
    space.write_text("space: {train.lr: {logfloat: [" + "1e-3, " * 200_000 + "1]}}\n")
    err = _error(capsys, ["tune", str(space), "--trials", "1", "--out-dir", str(tmp_path)])
    assert "too long" in err
    space.write_text("space: {train.lr: {logfloat: " + "x" * 5000 + "}}\n")
    err = _error(capsys, ["tune", str(space), "--trials", "1", "--out-dir", str(tmp_path)])
    assert "takes a list" in err and len(err) < 400


def test_report_reads_run_configs_like_configs(trained, tmp_path, capsys, caplog):
    """A hostile config.yaml costs its run's settings, in one short line; the report goes on."""
    runs = [tmp_path / name for name in ("good", "bomb", "link", "broken")]
    for run in runs:
        shutil.copytree(trained["run"], run)
    (runs[1] / "config.yaml").write_text(yaml_bomb())
    outside = tmp_path / "outside.yaml"
    outside.write_text("model: {hidden_size: 8}\n")
    (runs[2] / "config.yaml").unlink()
    (runs[2] / "config.yaml").symlink_to(outside)
    (runs[3] / "config.yaml").write_text("hunter2secret: [\n")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        code = main(["report", *map(str, runs), "--no-plot", "--out", str(tmp_path / "r")])
    assert code == 0 and time.perf_counter() - start < 20
    table = capsys.readouterr().out
    assert all(f"| {run.name} |" in table for run in runs)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 3 and all(len(w) < SHORT and "\n" not in w for w in warnings)
    assert "aliases" in warnings[0] and "symbolic link" in warnings[1]
    assert "not valid YAML" in warnings[2] and "hunter2secret" not in warnings[2]


def test_planted_evaluations_and_dynamic_db_links_are_refused(run_copy, tmp_path, caplog, capsys):
    """``evaluate`` appends to evaluations.jsonl and ``tune --dynamic`` opens dynamic.db
    without following a link planted in the run folder."""
    pytest.importorskip("optuna")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run_copy / "evaluations.jsonl").symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        evaluate(run_copy, "test", device="cpu")
    assert "evaluations.jsonl" in caplog.text and "symbolic link" in caplog.text
    assert victim.read_text() == "precious\n"
    (run_copy / "evaluations.jsonl").unlink()
    evaluate(run_copy, "test", device="cpu")  # a plain file is still recorded
    assert len((run_copy / "evaluations.jsonl").read_text().splitlines()) == 1
    (run_copy / "dynamic.db").symlink_to(tmp_path / "elsewhere.db")  # dangling: SQLite creates it
    argv = ["tune", "--dynamic", str(run_copy), "--trials", "1", "--device", "cpu"]
    err = _error(capsys, [*argv, "--max-tokens", "20"])
    assert "dynamic.db" in err and "symbolic link" in err
    assert not (tmp_path / "elsewhere.db").exists()
    err = _error(capsys, [*argv, "--study", "../escape"])
    assert "not a path" in err and not (tmp_path / "runs" / "escape.db").exists()


@pytest.mark.parametrize("command", ["report", "tune"])
def test_out_of_memory_hint_fits_the_command(command, trained, tmp_path, capsys, monkeypatch):
    """``report`` and ``tune`` never tell the user to lower training keys they did not set."""
    from moglstm.lm import report as report_module
    from moglstm.lm import tune as tune_module

    def fail(*args: Any, **kwargs: Any) -> None:
        raise MemoryError

    space = tmp_path / "space.yaml"
    space.write_text("space: {train.lr: {logfloat: [1.0e-3, 1.0e-2]}}\n")
    if command == "report":
        monkeypatch.setattr(report_module, "_read_config", fail)
        argv = ["report", str(trained["run"]), "--no-plot", "--out", str(tmp_path / "r")]
    else:
        monkeypatch.setattr(tune_module, "load_space", fail)
        argv = ["tune", str(space), "--trials", "1", "--out-dir", str(tmp_path)]
    err = _error(capsys, argv, code=1)
    assert "out of memory" in err and "model.hidden_size" not in err and "data." not in err
    assert ("run folders" if command == "report" else "search-space") in err


# --------------------------------------------------------------------------- second pass (issue 22)


@pytest.mark.parametrize(
    "override",
    [
        "model.forget_bias=1e39",
        "train.lr=1e308",
        "train.dist_timeout=1e308",
        "train.dist_timeout=1e-320",
        "train.eps=1e-320",
        "model.cell_init_factor=1e300",
        "train.betas=[0.5, 1.0]",
    ],
)
def test_floats_that_cannot_train_are_config_errors(override, trained, tmp_path, capsys):
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path), override]
    err = _error(capsys, argv)
    assert override.split("=")[0] in err and "must be" in err, err
    assert not (tmp_path / "run").exists()


def test_every_float_key_has_a_documented_range():
    import dataclasses
    import typing

    from moglstm.lm.config import RunConfig
    from moglstm.lm.config.plain import hints
    from moglstm.lm.config.ranges import FLOAT_RANGES, describe_ranges

    def floats(cls: type, prefix: str) -> list[str]:
        found = []
        for name, tp in hints(cls).items():
            args = set(typing.get_args(tp)) | {tp}
            if dataclasses.is_dataclass(tp):
                found += floats(tp, f"{prefix}{name}.")
            elif float in args or any(float in typing.get_args(a) for a in args):
                found.append(prefix + name)
        return found

    assert sorted(floats(RunConfig, "")) == sorted(FLOAT_RANGES)
    assert all(math.isfinite(r.low) and math.isfinite(r.high) for r in FLOAT_RANGES.values())
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    assert describe_ranges() in doc  # the docs' table is generated from the ranges


def test_diverged_weights_never_end_in_success(trained, tmp_path, monkeypatch, capsys):
    """Weights that become infinite while the loss stays finite: exit 1 naming the tensor,
    nothing saved over the last finite checkpoint, which resumes."""
    from moglstm.lm import train as train_module

    real_step = train_module._train_step

    def step(run: Any, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        loss = real_step(run, inputs, targets)
        if run.counters.step == 2:  # the step being taken is the third
            bias = dict(run.model.named_parameters())["layers.0.bias_hh_l0"]
            with torch.no_grad():  # the forget gate's (i, f, g, o): saturated, loss finite
                bias[8:16].fill_(math.inf)
        return loss

    monkeypatch.setattr(train_module, "_train_step", step)
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path)]
    err = _error(capsys, argv, code=1)
    assert "weights diverged by step 4" in err and "NaN or infinite" in err, err
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["counters"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    monkeypatch.setattr(train_module, "_train_step", real_step)
    assert main(_resume_argv(tmp_path / "run")) == 0


def _count_by_building(model: Any, vocab: int) -> int:
    from moglstm.lm.models import build_on_meta, count_parameters

    return count_parameters(build_on_meta(model, vocab))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.kind=lstm", "model.num_layers=3", "model.hidden_size=12"],
        ["model.kind=gru", "model.num_layers=1"],
        ["model.kind=rnn", "model.num_layers=4", "model.embedding_size=6"],
        ["model.num_layers=3", "model.mogrifier.rounds=0"],
        ["model.num_layers=1", "model.mogrifier.rounds=1"],
        ["model.num_layers=2", "model.mogrifier.rounds=4", "model.embedding_size=10"],
        ["model.num_layers=3", "model.mogrifier.rounds=5", "model.mogrifier.rank=3"],
        ["model.num_layers=4", "model.mogrifier.rounds=6", "model.output.tie_weights=false"],
        ["model.num_layers=2", "model.mogrifier.rounds=7", "model.output.mos_components=3"],
        ["model.mogrifier.rounds=9", "model.mogrifier.coupled=true", "model.embedding_size=7"],
        ["model.mogrifier.rounds=8", "model.init=official", "model.embedding_ratio=0.5"],
        ["model.kind=transformer", "model.transformer.depth=3", "model.transformer.max_len=20"],
        [
            "model.kind=transformer",
            "model.transformer.depth=5",
            "model.transformer.max_len=33",
            "model.transformer.positional_kind=learned",
            "model.transformer.ffn_size=24",
        ],
    ],
)
def test_the_bounded_parameter_count_equals_building_the_model(overrides):
    from moglstm.lm.models import parameter_count

    small = ["model.hidden_size=16", "model.transformer.d_model=16", "data.bptt=8"]
    cfg = load_config(None, [*small, *overrides])
    assert parameter_count(cfg.model, 37) == _count_by_building(cfg.model, 37)
    estimate = budget.training_memory(cfg, 37, _count_by_building(cfg.model, 37))
    assert budget.check_training_fits(cfg, 37, torch.device("cpu")).state == estimate.state


@pytest.mark.parametrize(
    "override",
    [
        "model.num_layers=1000000000",
        "model.kind=mogrifier model.mogrifier.rounds=1000000000",
        "model.kind=transformer model.transformer.depth=1000000000",
        "model.kind=transformer model.transformer.max_len=1000000000",
        "model.kind=transformer model.transformer.max_len=1000000000 "
        "model.transformer.positional_kind=learned",
    ],
)
def test_size_checks_are_arithmetic_not_loops(override, trained, tmp_path, capsys):
    """A billion layers, rounds, blocks or positions: refused in well under a second of
    counting, in little memory, with the numbers (issue 22, 3 and 4)."""
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path), *override.split()]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        err = _error(capsys, argv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 10 and peak < 50_000_000
    assert "needs about" in err and "available" in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


def _fake_system(root: Path, cgroup: str, mountinfo: str, files: dict[str, str]) -> Path:
    """A fake /proc and /sys under ``root`` (for budget.memory_limits)."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "meminfo").write_text("MemTotal: 100000000 kB\nMemAvailable: 20000000 kB\n")
    (root / "proc" / "self" / "cgroup").write_text(cgroup)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


GiB = 1 << 30


def test_memory_is_the_smallest_of_the_machine_and_the_process_cgroups(tmp_path):
    v2 = _fake_system(
        tmp_path / "v2",
        "0::/user.slice/job\n",
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
        {
            "sys/fs/cgroup/memory.max": "max\n",
            "sys/fs/cgroup/user.slice/memory.max": f"{8 * GiB}\n",
            "sys/fs/cgroup/user.slice/memory.current": f"{1 * GiB}\n",
            "sys/fs/cgroup/user.slice/job/memory.max": f"{3 * GiB}\n",
            "sys/fs/cgroup/user.slice/job/memory.current": f"{GiB // 2}\n",
        },
    )
    room, where = budget.available_memory(torch.device("cpu"), v2)
    assert room == 3 * GiB - GiB // 2
    assert where.startswith("this process's cgroup /user.slice/job (v2: memory.max 3.2 GB")
    assert len(budget.memory_limits(v2)) == 3  # the machine, the job, its parent
    v1 = _fake_system(
        tmp_path / "v1",
        "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        {
            "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2 * GiB}\n",
            "sys/fs/cgroup/memory/memory.usage_in_bytes": "1000\n",
        },
    )
    assert budget.available_memory(torch.device("cpu"), v1) == (
        2 * GiB - 1000,
        "this process's cgroup / (v1: memory.limit_in_bytes 2.1 GB, 1.0 kB in use) has",
    )
    free = _fake_system(tmp_path / "free", "0::/\n", "", {})  # no cgroup limit: the machine
    machine = (20_480_000_000, "this machine has")
    assert budget.available_memory(torch.device("cpu"), free) == machine
    assert budget.available_memory(torch.device("cpu"), tmp_path / "nothing") is None


def test_a_run_that_cannot_fit_its_cgroup_is_refused(trained, tmp_path, monkeypatch, capsys):
    """400M parameters (6.4 GB to train) in a 3 GiB cgroup of a 20 GB machine (issue 22, 5)."""
    root = _fake_system(
        tmp_path / "sys",
        "0::/job\n",
        "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        {"sys/fs/cgroup/job/memory.max": f"{3 * GiB}\n", "sys/fs/cgroup/job/memory.current": "0"},
    )
    monkeypatch.setattr(budget, "SYSTEM_ROOT", root)
    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path)]
    err = _error(capsys, [*argv, "model.hidden_size=5000", "model.num_layers=2"])
    assert "this process's cgroup /job (v2: memory.max 3.2 GB" in err, err
    assert main([*argv]) == 0  # a small model fits


def test_report_never_waits_on_a_fifo_nor_follows_a_linked_metrics_file(
    run_copy, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # report writes its files here
    (run_copy / "best.pt").unlink()
    os.mkfifo(run_copy / "best.pt")  # torch.load(mmap=True) of it waited forever
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"step": 999, "split": "valid", "loss": 0.001, "ppl": 1.0}\n')
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "metrics.jsonl").symlink_to(outside)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(["report", str(run_copy)]) == 0
    assert time.perf_counter() - start < 20
    out = capsys.readouterr().out
    assert "999" not in out  # the linked file's records are not the run's
    warnings = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(warnings) == 1 and "symbolic link" in warnings[0], warnings


def test_report_leaves_out_undecodable_and_ill_typed_metrics_lines(
    run_copy, tmp_path, capsys, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # report writes its files here
    with open(run_copy / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "split": "train", "loss": "\xff\xfe"}\n')  # not UTF-8
        f.write(b'{"step": "six", "split": "train", "loss": 1.0}\n')
        f.write(b'{"step": 7, "split": "valid", "loss": [1, 2]}\n')
        f.write(b'{"step": 8, "split": ["valid"], "loss": 1.0}\n')
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(["report", str(run_copy)]) == 0
    lines = [r.getMessage() for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert len(lines) == 1 and "4 line(s)" in lines[0], lines
    assert "Traceback" not in capsys.readouterr().err


def test_an_unreadable_best_falls_back_like_a_damaged_one(run_copy, monkeypatch, caplog):
    from moglstm.lm.runs import checkpoint as checkpoint_module

    best = run_copy / "best.pt"
    save_checkpoint(best, load_checkpoint(best), keep_previous=True)  # best.prev.pt too
    real_open = checkpoint_module.open_run_file

    def open_run_file(path: Any, limit: Any = None) -> Any:
        if Path(path) == best:  # what chmod 000 does for a user other than root
            raise PermissionError(13, "Permission denied")
        return real_open(path, limit)

    monkeypatch.setattr(checkpoint_module, "open_run_file", open_run_file)
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        result = evaluate(run_copy, "valid", device="cpu", max_tokens=50)
    assert result["checkpoint"].endswith("best.prev.pt")
    assert any("Permission denied" in r.getMessage() for r in caplog.records)


def _position(payload: dict) -> None:
    payload["data"]["position"] = -5


def _state_3d(payload: dict) -> None:
    h, c = payload["train_state"][0]
    payload["train_state"][0] = (h.unsqueeze(0), c)


def _step_nan(payload: dict) -> None:
    payload["counters"]["step"] = float("nan")


def _elapsed_inf(payload: dict) -> None:
    payload["counters"]["elapsed"] = float("inf")


def _layers(payload: dict) -> None:
    payload["config"]["model"]["num_layers"] = 1_000_000_000


@pytest.mark.parametrize("change", [_position, _state_3d, _step_nan, _elapsed_inf, _layers])
def test_crafted_checkpoints_fall_back_to_the_previous_good_one(run_copy, caplog, change):
    """Inconsistent data position, carried state, counters or layer count: one line, and
    the run resumes from last.prev.pt (issue 22, minor)."""
    assert (run_copy / "last.prev.pt").exists()
    _rewrite(run_copy / "last.pt", change)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(_resume_argv(run_copy, "train.max_steps=6")) == 0
    assert time.perf_counter() - start < 30
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "last.pt" in skipped[0], skipped
    assert load_checkpoint(run_copy / "last.pt")["counters"]["step"] == 6


def test_a_folder_with_best_but_no_last_resumes_from_best(run_copy, caplog, capsys):
    """Killed between the best.pt and last.pt installs of the first save: --resume goes on
    from best.pt, said once (a new run there is refused, naming --resume)."""
    for name in ("last.pt", "last.prev.pt"):
        (run_copy / name).unlink()
    step = load_checkpoint(run_copy / "best.pt")["counters"]["step"]
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        assert main(_resume_argv(run_copy, f"train.max_steps={step + 2}")) == 0
    said = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert len(said) == 1 and "best.pt" in said[0], said
    assert load_checkpoint(run_copy / "last.pt")["counters"]["step"] == step + 2


@pytest.mark.parametrize("where", ["validation", "temperature search", "final validation"])
def test_a_signal_ends_a_long_validation_at_once(where, trained, tmp_path, monkeypatch):
    """SIGTERM while validation (or its temperature search) scores: the run stops within a
    second, saving the step reached without that validation (issue 22, signals)."""
    import signal

    from moglstm.lm import train as train_module

    real = {"evaluate_loss": train_module.evaluate_loss, "score_split": train_module.score_split}
    target = "score_split" if where == "temperature search" else "evaluate_loss"
    stopped_at = {}

    def slow(*args: Any, **kwargs: Any) -> Any:
        stopped_at.setdefault("sent", time.perf_counter())
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(600):  # a validation of a minute: 600 windows, polled between them
            time.sleep(0.1)
            kwargs["progress"].update(0, None)
        return real[target](*args, **kwargs)

    monkeypatch.setattr(train_module, target, slow)
    steps = {"validation": 4, "temperature search": 4, "final validation": 3}[where]
    extra = ["train.eval_temperature_tokens=40"] if where == "temperature search" else []
    overrides = _cfg_overrides(trained["corpus"], tmp_path, max_steps=steps, eval_every=4)
    result = train(load_config(None, [*overrides, *extra]), quiet=True)
    assert time.perf_counter() - stopped_at["sent"] < 5
    assert result["stopped"] == "SIGTERM" and result["step"] == steps
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["counters"]["step"] == steps
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"split": "valid"' not in records  # the abandoned validation left no record
    # the resume owes that validation: it does it first, so no step goes unvalidated
    monkeypatch.undo()
    resumed = train(load_config(None, [*overrides, *extra]), resume=True, quiet=True)
    assert resumed["stopped"] == "max_steps" and resumed["step"] == steps
    valid = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"split": "valid"' in line
    ]
    assert [r["step"] for r in valid] == [steps], valid
    assert resumed["valid_loss"] == pytest.approx(valid[0]["loss"])


_SLOW_SCORING = """
import os, signal, sys, time
from moglstm.lm import dynamic_eval, evaluate
def slow(*args, **kwargs):
    print("scoring", flush=True)
    for _ in range(600):
        time.sleep(0.1)
for module, name in ((evaluate, "evaluate_loss"), (evaluate, "score_split"),
                     (dynamic_eval, "_window_loss")):
    setattr(module, name, slow)
from moglstm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "signame, extra",
    [
        ("SIGTERM", ["--dynamic"]),
        pytest.param("SIGINT", ["--dynamic"], marks=pytest.mark.slow),
        pytest.param("SIGTERM", [], marks=pytest.mark.slow),
        pytest.param("SIGINT", [], marks=pytest.mark.slow),
        pytest.param("SIGTERM", ["--temperature", "auto"], marks=pytest.mark.slow),
        pytest.param("SIGINT", ["--temperature", "auto"], marks=pytest.mark.slow),
    ],
)
def test_signals_end_evaluation_and_dynamic_evaluation_at_once(run_copy, signame, extra):
    """``moglstm evaluate`` (plain, temperature search, dynamic) ends within seconds of
    SIGINT or SIGTERM (issue 22, signals); the process group is ended in any case."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SLOW_SCORING,
            "evaluate",
            str(run_copy),
            "--max-tokens",
            "50",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "scoring"
        start = time.perf_counter()
        proc.send_signal(getattr(signal, signame))
        proc.wait(timeout=10)
        assert time.perf_counter() - start < 5
        assert proc.returncode in (130, -signal.SIGTERM, 143), proc.returncode
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --------------------------------------------------------------------------- campaign

CAMPAIGN_SEED = 22


def _damage(rng: Any, run: Path, outside: Path) -> str:
    """Do one random harm to the run folder; return what was done (for the message)."""
    names = ["last.pt", "last.prev.pt", "best.pt", "best.prev.pt", "metrics.jsonl", ".lock"]
    name = rng.choice(names)
    path = run / name
    action = rng.choice(
        ["truncate", "flip", "delete", "fifo", "link", "folder", "garbage", "craft", "nothing"]
    )
    if action in ("fifo", "link", "folder"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if action == "fifo":
            os.mkfifo(path)
        elif action == "link":
            path.symlink_to(outside)
        else:
            path.mkdir()
        return f"{action} {name}"
    if not path.is_file() or path.is_symlink():
        return f"nothing ({name} is not a file)"
    data = path.read_bytes()
    if action == "truncate":
        path.write_bytes(data[: rng.randrange(len(data) + 1)])
    elif action == "flip" and data:
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
    elif action == "delete":
        path.unlink()
    elif action == "garbage":
        path.write_bytes(data + bytes(rng.randrange(256) for _ in range(40)) + b"\n")
    elif action == "craft" and name.endswith(".pt"):
        try:
            _rewrite(path, rng.choice([_position, _state_3d, _step_nan, _shape, _nan, _layers]))
        except Exception:  # already damaged: torch cannot read it to craft it
            return f"nothing ({name} unreadable)"
    return f"{action} {name}"


def _campaign(trained: dict[str, Path], tmp_path: Path, seconds: float, seed: int) -> int:
    """Damage, crash and resume in a loop for ``seconds``: every resume succeeds or says
    why in one line, and a run that could not go on is restored and goes on."""
    import random

    from moglstm.lm import train as train_module

    rng = random.Random(seed)
    run, outside = tmp_path / "runs" / "run", tmp_path / "outside.txt"
    outside.write_text("precious\n")
    pristine = tmp_path / "pristine"
    shutil.copytree(trained["run"], pristine, symlinks=True)
    shutil.copytree(pristine, run, symlinks=True)
    rounds, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or rounds < 3:
        rounds += 1
        done = [_damage(rng, run, outside) for _ in range(rng.randrange(1, 3))]
        crash_at = rng.choice([None, 1, 2])

        def on_step(n: int, _: Any, crash_at: Any = crash_at, seen: dict = {}) -> None:  # noqa: B006
            if crash_at is not None and n == seen.setdefault("first", n) + crash_at:
                raise KeyboardInterrupt("simulated kill")  # a crash mid-run, between steps

        code, err, what = _resume_with(run, rng.randrange(5, 9), on_step, train_module)
        context = f"seed {seed}, round {rounds}: {'; '.join(done)}, crash at {crash_at}: {err}"
        assert outside.read_text() == "precious\n", context  # nothing written through a link
        assert "Traceback" not in err and code in (0, 1, 2, 130), context
        if code == 2:  # it said why: the folder cannot go on as it is; start again from a copy
            assert what.startswith("moglstm train: error:") and len(what) < SHORT, context
            shutil.rmtree(run)
            shutil.copytree(pristine, run, symlinks=True)
        elif code == 0:  # what the next resume starts from is a good checkpoint
            from moglstm.lm.runs.folder import _load_last

            assert _load_last(run)["counters"]["step"] >= 4, context
    return rounds


def _resume_with(run: Path, steps: int, on_step: Any, train_module: Any) -> tuple[int, str, str]:
    """``moglstm train --resume`` in this process with ``on_step`` hooked in; returns the
    exit code, stderr, and its last line (the error, if any)."""
    import contextlib
    import io

    real = train_module.train

    def hooked(cfg: Any, resume: bool = False, **kwargs: Any) -> Any:
        return real(cfg, resume, **{**kwargs, "on_step": on_step})

    err = io.StringIO()
    train_module.train = hooked  # the command imports it from the module when it runs
    try:
        with contextlib.redirect_stderr(err):
            code = main(_resume_argv(run, f"train.max_steps={steps}"))
    finally:
        train_module.train = real
    text = err.getvalue().strip()
    return code, text, text.splitlines()[-1] if text else ""


def test_campaign_of_kills_damage_and_planted_files(trained, tmp_path):
    """A few seconds of random damage, planted files and crashes (the slow variant runs 20 s,
    or MOGLSTM_CAMPAIGN_SECONDS): every run resumes, or says in one line why it cannot."""
    seconds = 3.0
    assert _campaign(trained, tmp_path, seconds, CAMPAIGN_SEED) >= 3


@pytest.mark.slow
def test_campaign_of_kills_damage_and_planted_files_for_longer(trained, tmp_path):
    seconds = float(os.environ.get("MOGLSTM_CAMPAIGN_SECONDS", "20"))
    assert _campaign(trained, tmp_path, seconds, CAMPAIGN_SEED + 1) >= 5


def test_a_deleted_lock_file_lets_no_second_writer_in(trained, tmp_path, capsys):
    """The lock is on the run folder itself: without ``.lock`` a second run is refused,
    naming the holder's pid and start time (issue 22, 1)."""
    from moglstm.lm.runlock import RunLock

    argv = ["train", "--quiet", *_cfg_overrides(trained["corpus"], tmp_path)]
    assert main(argv) == 0
    with RunLock(tmp_path / "run"):
        (tmp_path / "run" / ".lock").unlink()
        err = _error(capsys, [*_resume_argv(tmp_path / "run"), "train.max_steps=6"])
        assert f"in use by another moglstm process (pid {os.getpid()}, since " in err, err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["counters"]["step"] == 4
