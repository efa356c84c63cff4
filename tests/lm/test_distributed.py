"""Tests for moglstm.lm.distributed: sharding, rank-0 I/O, and DDP against one process.

The multi-process test launches ``torchrun`` with 2 gloo processes on 127.0.0.1 (a
free port) and compares with single-process runs of the same global batch.

Tolerance: the ranks' runs agree with the single process to a relative 1e-5 in
every logged loss and 1e-4 (absolute) in every weight. They are not bit-identical
because the arithmetic is grouped differently: each rank multiplies matrices of
B/2 columns (other kernel blocking), the global loss is the mean of two per-rank
means, and DDP sums two gradients and divides by 2 instead of averaging one
batch. Each of these changes float32 results in the last bits (~1e-7 relative);
12 Adam steps keep the loss differences at about that size (measured: at most
1.2e-7 relative), so 1e-5 leaves a wide margin, while other data (a wrong shard)
would change the per-window losses by percents.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from moglstm.lm import distributed
from moglstm.lm.config import load_config
from moglstm.lm.distributed import DistContext
from moglstm.lm.train import train

TWO = DistContext(rank=1, world_size=2)  # rank 1 of 2, for the pure (no-collective) helpers
REPO = Path(__file__).resolve().parents[2]
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- single process


def test_single_process_session_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session("cpu") as ctx:
        assert ctx == DistContext(device=torch.device("cpu"))
        assert ctx.is_main and not ctx.distributed
        data = torch.arange(12).view(4, 3)
        assert distributed.shard_streams(data, ctx) is data
        assert distributed.shard_eval_streams(data, ctx) is data
        assert distributed.mean_over_ranks(0.1, ctx) == 0.1
        assert distributed.average_loss(2.5, 7, ctx) == (2.5, 7)
        assert distributed.run_on_main(lambda: 42, ctx) == 42
        assert distributed.main_first(lambda: "x", ctx) == "x"
        assert distributed.broadcast_object({"a": 1}, ctx) == {"a": 1}
        assert distributed.gather_rng(ctx) == {}
        state = [(torch.ones(1, 4, 2), torch.zeros(1, 4, 2))]
        assert distributed.gather_state(state, ctx) is state
        assert distributed.scatter_state(state, ctx) is state


def test_malformed_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        with distributed.session("cpu"):
            pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match=r"RANK=5 is not in \[0, WORLD_SIZE=2\)"):
        with distributed.session("cpu"):
            pass


def test_devices_of_ranks():
    assert distributed._rank_device("cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(ValueError, match="mps"):
        distributed._rank_device("mps", 0, 2)
    if not torch.cuda.is_available():
        assert distributed._rank_device("auto", 1, 2) == torch.device("cpu")
        with pytest.raises(ValueError, match="0 CUDA device"):
            distributed._rank_device("cuda", 0, 2)


# --------------------------------------------------------------------------- sharding


def test_shards_are_column_blocks_of_the_global_batch():
    data = torch.arange(40).view(5, 8)  # (N=5 rows, B=8 streams)
    shards = [distributed.shard_streams(data, DistContext(r, 4)) for r in range(4)]
    assert all(s.shape == (5, 2) and s.is_contiguous() for s in shards)
    assert torch.equal(torch.cat(shards, dim=1), data)
    assert torch.equal(shards[1], data[:, 2:4])


def test_batch_size_must_divide_by_world_size():
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible by the 4"):
        distributed.check_batch_size(6, DistContext(0, 4))
    with pytest.raises(ValueError, match="not divisible"):
        distributed.shard_streams(torch.zeros(5, 6, dtype=torch.long), DistContext(0, 4))
    distributed.check_batch_size(8, DistContext(0, 4))


def test_evaluation_shards_are_as_even_as_possible():
    data = torch.arange(15).view(5, 3)
    widths = [distributed.shard_eval_streams(data, DistContext(r, 2)).size(1) for r in range(2)]
    assert widths == [2, 1]
    empty = distributed.shard_eval_streams(data, DistContext(3, 4))  # more ranks than streams
    assert empty.shape == (5, 0)


def test_token_cap_scores_the_same_rows():
    # a cap of 100 tokens over 3 streams scores ceil(100/3) = 34 rows
    assert distributed.local_token_cap(100, 3, 2) == 68
    assert distributed.local_token_cap(100, 3, 1) == 34
    assert distributed.local_token_cap(100, 3, 3) == 100
    assert distributed.local_token_cap(None, 3, 1) is None


def test_scatter_takes_this_ranks_columns_of_the_state():
    h = torch.arange(2 * 4 * 3.0).view(2, 4, 3)  # (layers, B=4, H)
    state = [(h, h + 100), h[0]]  # an LSTM layer's (h, c) and a 2-D (B, H) tensor
    mine = distributed.scatter_state(state, TWO)
    assert torch.equal(mine[0][0], h[:, 2:]) and torch.equal(mine[0][1], h[:, 2:] + 100)
    assert torch.equal(mine[1], h[0, 2:])
    with pytest.raises(ValueError, match="batch of 3"):
        distributed.scatter_state([torch.zeros(1, 3, 2)], TWO)


def test_rank_seeds_differ_and_repeat():
    seeds = {distributed.rank_seed(1, r) for r in range(8)}
    assert len(seeds) == 8
    assert distributed.rank_seed(1, 3, 10) == distributed.rank_seed(1, 3, 10)
    assert distributed.rank_seed(1, 3, 10) != distributed.rank_seed(1, 3, 11)
    assert all(0 <= s < 2**63 for s in seeds)


def test_restore_rng_seeds_ranks_the_checkpoint_lacks():
    from moglstm.lm.runtime import capture_rng_state

    saved = capture_rng_state()
    payload = {"rng": saved, "counters": {"step": 7}}
    torch.manual_seed(123)
    distributed.restore_rng(payload, DistContext(0, 2), seed=1)  # rank 0: the saved state
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    distributed.restore_rng(payload, DistContext(1, 2), seed=1)  # rank 1: derived seed
    first = torch.rand(3)
    torch.manual_seed(distributed.rank_seed(1, 1, 7))
    assert torch.equal(first, torch.rand(3))


def test_wrap_model_is_identity_for_one_process():
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, DistContext()) is model


# --------------------------------------------------------------------------- two processes

_WORKER = r"""
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from moglstm.cli import main
from moglstm.lm import distributed
from moglstm.lm.config import load_config
from moglstm.lm.train import train

out, report, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(1)
location = ["--out-dir", out, "--quiet"]
codes = [
    # the command line: the first call starts the process group torchrun describes,
    # the next ones (like the library below) use it
    main(["train", *overrides, "--name", "ddp", *location]),
    main(["train", *overrides, "train.max_steps=6", "--name", "half2", *location]),
    main(["train", "--resume", f"{out}/half1", "train.max_steps=12", "--quiet"]),
]
# the library, in the same job
rank = dist.get_rank()
results = train(load_config(None, [*overrides, "name=lib", f"out_dir={out}"]), quiet=True)
with distributed.session("cpu") as ctx:
    mine = torch.full((1, 2, 3), float(rank))  # rank r's two streams hold r
    state = distributed.gather_state([(mine, mine + 10)], ctx)
    back = distributed.scatter_state(state, ctx)
    checks = {
        "gathered": state[0][0][0, :, 0].tolist(),
        "round_trip": bool(torch.equal(back[0][0], mine) and torch.equal(back[0][1], mine + 10)),
        "mean": distributed.mean_over_ranks(float(rank), ctx),
        "average": distributed.average_loss(1.0 + rank, 3 - rank, ctx),
        "broadcast": distributed.broadcast_object(f"from {rank}", ctx),
    }
    try:
        distributed.run_on_main(lambda: 1 / 0, ctx)
    except ZeroDivisionError as exc:
        checks["error"] = str(exc)
(report / f"rank{rank}.json").write_text(json.dumps(
    {"codes": codes, "results": results, "checks": checks}))
"""


def _run_torchrun(command: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    """Run torchrun with its output in ``log``; on a timeout stop it and its workers.

    The workers are session leaders of their own, so they are stopped through torchrun
    (SIGTERM makes it terminate them) rather than by a process-group kill.
    """
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return -1


def _overrides(corpus: Path) -> list[str]:
    """A tiny Mogrifier run: carried state, variable-length windows, no dropout.

    Dropout is off because ranks draw their own masks (see moglstm.lm.distributed);
    with it the runs are statistically alike but not comparable step by step.
    """
    return [
        "data.corpus=text",
        f"data.path={corpus}",
        "data.batch_size=4",
        "data.bptt=8",
        "data.variable_length=true",
        "data.eval_batch_size=3",  # splits 2 + 1 over the ranks
        "model.hidden_size=16",
        "model.mogrify_rounds=2",
        "model.implementation=reference",  # the fused path is tested in tests/nn
        "train.lr=0.01",
        "train.max_steps=12",
        "train.eval_every=4",
        "train.log_every=2",
        "train.eval_max_tokens=100",
        "train.device=cpu",
        "train.seed=5",
    ]


def _single(out: Path, overrides: list[str], name: str, *extra: str) -> dict[str, Any]:
    cfg = load_config(None, [*overrides, f"name={name}", f"out_dir={out}", *extra])
    return train(cfg, quiet=True)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_curves_match(run_dir: Path, reference: Path, skip: Any = ()) -> float:
    """Same events; losses equal to LOSS_RTOL. Returns the largest relative difference.

    ``skip``: (step, split) events of ``run_dir`` to leave out, such as the extra
    validation at the end of a run that stopped early and was resumed.
    """
    got = [r for r in _records(run_dir) if (r["step"], r["split"]) not in skip]
    want = _records(reference)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL), (a, b)
        assert a["lr"] == b["lr"]
        worst = max(worst, abs(a["loss"] - b["loss"]) / abs(b["loss"]))
    return worst


def _assert_weights_match(run_dir: Path, reference: Path) -> float:
    """Weights and carried state within WEIGHT_ATOL; returns the largest weight difference."""
    a = torch.load(run_dir / "last.pt", weights_only=True)
    b = torch.load(reference / "last.pt", weights_only=True)
    assert a["counters"]["step"] == b["counters"]["step"]
    assert a["counters"]["tokens"] == b["counters"]["tokens"]  # global, not per rank
    assert a["data"]["position"] == b["data"]["position"]
    for key, tensor in b["model"].items():
        torch.testing.assert_close(a["model"][key], tensor, atol=WEIGHT_ATOL, rtol=0)
    for (ha, ca), (hb, cb) in zip(a["train_state"], b["train_state"], strict=True):
        assert ha.shape == hb.shape == (1, 4, 16)  # the global batch's carried state
        torch.testing.assert_close(ha, hb, atol=WEIGHT_ATOL, rtol=0)
        torch.testing.assert_close(ca, cb, atol=WEIGHT_ATOL, rtol=0)
    return max((a["model"][k] - t).abs().max().item() for k, t in b["model"].items())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(make_text_corpus, tmp_path, free_port):
    """2 ranks x batch 2 walk the data of 1 process x batch 4; resumes switch world size.

    About 30 s on 2 cores (starting torchrun and its two workers takes most of it).
    """
    corpus, out, report = make_text_corpus(), tmp_path / "runs", tmp_path / "report"
    report.mkdir()
    overrides = _overrides(corpus)
    single = _single(out, overrides, "single")
    _single(out, overrides, "half1", "train.max_steps=6")  # resumed below by 2 ranks
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port}",
        str(worker),
        str(out),
        str(report),
        json.dumps(overrides),
    ]
    log = tmp_path / "torchrun.log"
    code = _run_torchrun(command, env, log, timeout=240)
    assert code == 0, log.read_text()[-6000:]
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["codes"] for r in ranks] == [[0, 0, 0], [0, 0, 0]]

    # the same data walked: losses and weights of one process, within float noise
    worst = _assert_curves_match(out / "ddp", out / "single")
    weights = _assert_weights_match(out / "ddp", out / "single")
    print(f"2 ranks vs 1 process: losses within {worst:.1e} (relative), weights {weights:.1e}")
    # every rank reports the same results, equal to the single process's
    a, b = (r["results"] for r in ranks)
    for key in ("train_loss", "valid_loss", "best_valid_loss", "step"):
        assert a[key] == b[key], key
    assert a["valid_loss"] == pytest.approx(single["valid_loss"], rel=LOSS_RTOL)
    # only rank 0 wrote: no doubled lines, nothing but the run's own files
    written = {p.name for p in (out / "ddp").iterdir()} - {"best.prev.pt"}
    events = {n for n in written if n.startswith("events.out.tfevents")}
    assert len(events) == (1 if importlib.util.find_spec("tensorboard") else 0), events
    assert written - events == {
        ".lock",
        "config.yaml",
        "metrics.jsonl",
        "status.json",
        "best.pt",
        "last.pt",
        "last.prev.pt",
    }
    # resumes with another world size: 1 -> 2 (half1) and 2 -> 1 (half2, resumed here)
    train(_resume_cfg(out / "half2"), resume=True, quiet=True)
    for name in ("half1", "half2"):
        _assert_curves_match(out / name, out / "single", skip=[(6, "valid")])
        _assert_weights_match(out / name, out / "single")

    gathered = [r["checks"] for r in ranks]
    assert gathered[0] == gathered[1]
    checks = gathered[0]
    assert checks["gathered"] == [0.0, 0.0, 1.0, 1.0]  # rank order along the batch
    assert checks["round_trip"] is True
    assert checks["mean"] == 0.5
    assert checks["average"] == [pytest.approx((1 * 3 + 2 * 2) / 5), 5]
    assert checks["broadcast"] == "from 0"
    assert checks["error"] == "division by zero"  # rank 0's error, raised on both


def _resume_cfg(run_dir: Path):
    from moglstm.lm.runs.folder import resume_config

    return resume_config(run_dir, ["train.max_steps=12"])
