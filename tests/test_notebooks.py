"""The notebooks in notebooks/ run from top to bottom (nbclient), with small settings.

The kernel is this test's own Python (a kernelspec written into a temporary JUPYTER_PATH),
so the notebooks import the moglstm under test, whatever kernels the machine has installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "moglstm-test"
# settings that replace the notebooks' "parameters" cell values: seconds, not minutes
QUICK = {
    "train_and_compare.ipynb": "STEPS, EVAL_EVERY, BATCH, BPTT, EVAL_TOKENS, SAMPLE_TOKENS = "
    "12, 6, 4, 10, 500, 12",
}


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "moglstm tests", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # never a GUI, whatever the notebook asks
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    monkeypatch.setenv("PYTHONPATH", src)  # the moglstm under test, installed or not
    return KERNEL


def run_notebook(name: str, kernel: str, cwd: Path) -> list[dict]:
    """Execute the notebook in ``cwd``; return its code cells' outputs, flattened."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    if name in QUICK:
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(QUICK[name]))
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [
        "lstm_to_mogrifier.ipynb",
        "train_and_compare.ipynb",
    ]


@pytest.mark.slow
def test_lstm_to_mogrifier(kernel: str, tmp_path: Path) -> None:
    outputs = run_notebook("lstm_to_mogrifier.ipynb", kernel, tmp_path)
    text = text_of(outputs)
    checks = [line for line in text.splitlines() if line.rstrip().endswith(("equal", "DIFFERENT"))]
    assert len(checks) == 11 and all(line.endswith("equal") for line in checks), text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the gates' picture


@pytest.mark.slow
def test_train_and_compare(kernel: str, tmp_path: Path) -> None:
    outputs = run_notebook("train_and_compare.ipynb", kernel, tmp_path)
    runs = tmp_path / "runs" / "train-and-compare"
    assert (runs / "compare.png").is_file() and (runs / "compare.svg").is_file()
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves, shown
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    rows = [line for line in tables[-1].splitlines() if line.startswith(("| mogrifier", "| lstm"))]
    assert len(rows) == 2 and all("ppl" in row.split(" | ")[7] for row in rows)  # test column
    params = {row.split(" | ")[4] for row in rows}
    assert len(params) == 1  # the same budget
    text = text_of(outputs)
    assert "--- mogrifier\n" in text and "--- lstm\n" in text  # the samples
    assert text.count("split: test") == 2
