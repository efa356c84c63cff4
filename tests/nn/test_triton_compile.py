"""The Triton kernels compile ahead of time for sm_90 and sm_80 within the chips' limits.

``benchmarks/triton_aot.py`` compiles with ``triton.compile`` and a ``GPUTarget`` (no GPU
needed) in a child process without ``TRITON_INTERPRET`` (set for this one by conftest,
and read by triton when it is first imported).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests import processes

triton = pytest.importorskip("triton")
# ahead-of-time compiles take minutes: run with -m slow (.ci/run does)
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_aot.py"
NVIDIA = Path(triton.__file__).parent / "backends" / "nvidia"


def compile_reports(tmp_path, *args: str) -> list[dict]:
    if not NVIDIA.exists():
        pytest.skip("this triton wheel has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    # its own process group: a timeout ends the script's compile workers too
    done = processes.run(
        [sys.executable, str(SCRIPT), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if not out.exists():
        raise AssertionError(f"compile failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    reports = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout[-3000:]  # the script lists the problems
    return reports


def check(reports: list[dict]) -> None:
    limit = {90: 232_448, 80: 166_912}
    for r in reports:
        label = f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['aligned']} {r['constexprs']}"
        assert 0 <= r["shared"] <= limit[r["arch"]], label
        assert not r["spills"], label
        if r["kernel"] != "cell_backward_kernel" and r["dtype"] == "bf16":
            if r["tensor_cores"] is None:
                continue  # no cuobjdump in this wheel: the SASS cannot be read here
            assert r["tensor_cores"], label


def test_widest_bf16_kernels_compile_for_sm90(tmp_path):
    reports = compile_reports(tmp_path, "--arch", "90", "--which", "widest", "--only", "bf16")
    assert {r["kernel"] for r in reports} == {
        "linear_kernel",
        "two_product_kernel",
        "round_chain_kernel",
        "gates_back_kernel",
        "gates_cell_kernel",
        "cell_backward_kernel",
    }
    check(reports)


@pytest.mark.slow
def test_every_widest_configuration_compiles_for_sm90_and_sm80(tmp_path):
    """The widest variant of every kernel, tile, mode and operand dtype the dispatcher
    picks (the other variants' code is a subset), as the generic binary and as the one
    Triton builds for 16-byte-aligned pointers; ``--which all`` compiles all 644."""
    reports = compile_reports(
        tmp_path, "--arch", "90", "80", "--which", "widest", "--aligned", "both"
    )
    assert {r["aligned"] for r in reports} == {False, True}
    check(reports)
