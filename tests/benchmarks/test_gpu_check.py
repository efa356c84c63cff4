"""benchmarks/gpu_check.py runs end to end on a CPU in its dry-run mode (tiny sizes,
Triton's interpreter), so the script that waits for a GPU does not rot."""

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
    done = processes.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["tests"]["rc"] == 0, summary["tests"]["tail"]
    assert all(v["passed"] for v in summary["self_check"].values())
    assert summary["latency"]["eager_launch_us"] > 0
    assert summary["latency"]["grid_barrier_us"] > 0, summary["latency"]
    rows = summary["benchmark"]
    assert {r["implementation"] for r in rows} == {"torch", "torch-loop", "triton"}
    assert summary["ptb_paper"]["triton"]["steps"] == 2
    assert "ptb-paper:" in done.stdout
