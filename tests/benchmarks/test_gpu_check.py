"""benchmarks/gpu_check.py runs end to end on a CPU in its dry-run mode (tiny sizes,
Triton's interpreter), so the script that waits for a GPU does not rot: every part
(parallel compile in child processes, correctness eager/captured/replayed against
float64, the latency probe, timings with the profile, ptb-paper and ptb-paper-lstm on a
synthetic corpus, the tests on a deadline) writes its entry of the JSON summary."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests import processes

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    done = processes.run(  # its children (compile checks, pytest) end with its group
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--budget",
            "400",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["compile"]["verdicts"] == {"pass": len(summary["compile"]["rows"])}
    correctness = summary["correctness"]
    assert {r["shape"] for r in correctness} == {"target", "ptb-paper"}
    assert all(r["passed"] for r in correctness), correctness
    assert all(set(r["worst_rel_error"]) == {"eager", "captured", "replayed"} for r in correctness)
    assert summary["latency"]["eager_launch_us"] > 0
    rows = summary["timings"]["rows"]
    assert len(rows) == 7 and all(r["median_ms"] > 0 for r in rows.values()), rows
    assert any(name.startswith("cudnn float16 1 layer") for name in rows)
    assert any("low-rank in two launches" in name for name in rows)  # the speed lever
    assert summary["timings"]["profile"]
    for name in ("ptb-paper", "ptb-paper-lstm"):
        run = summary["ptb"][name]
        assert run["steps"] == 2 and run["tokens_per_s"] > 0 and run["loss_curve"], run
        assert run["layer_calls_by_backend"], run
    assert summary["tests"]["rc"] == 0, summary["tests"]["tail"]
    assert "ptb-paper:" in done.stdout
