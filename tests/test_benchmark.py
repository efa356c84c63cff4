"""The benchmark command's plumbing on a tiny shape (speed is measured by the command, not here)."""

import json

import pytest

from moglstm.benchmark import Shape, parse_shape, run_benchmark
from moglstm.cli import main


def test_floor_is_the_extra_arithmetic_of_the_rounds():
    # H = I = 512, r = 5, k = 84: 1 + r*k*(I+H) / (4*H*(I+H)) = 1 + 5*84/2048
    assert Shape().floor() == pytest.approx(1 + 5 * 84 / 2048)
    assert Shape(rounds=0).floor() == 1.0
    full = Shape(hidden=8, rank=None, layers=1, rounds=2)
    assert full.floor() == pytest.approx(1 + 2 * 64 / (4 * 8 * 16))


def test_parse_shape():
    assert parse_shape("B=8,T=5,H=32,k=none") == Shape(batch=8, seq_len=5, hidden=32, rank=None)
    with pytest.raises(ValueError, match="bad shape item"):
        parse_shape("B=8,X=3")


def test_run_benchmark_reports_every_implementation_and_mode():
    lines = []
    results = run_benchmark(
        [Shape(batch=2, seq_len=3, hidden=8, rank=2)],
        runs=2,
        warmup=0,
        memory=False,
        log=lines.append,
    )
    assert {(r.implementation, r.mode) for r in results} == {
        (i, m) for i in ("torch", "reference", "fused") for m in ("forward", "train")
    }
    for r in results:
        assert r.median_ms > 0 and len(r.times_ms) == 2 and r.tokens_per_s > 0
        assert (r.ratio_over_floor is None) == (r.implementation == "torch")
        assert (r.setup_s is not None) == (r.implementation == "fused")
    assert len(lines) == 7 and lines[0].startswith("fused: ") and "x 1.00 torch" in lines[1]


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "benchmark",
            "--shape",
            "B=2,T=3,H=8,k=2",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--impl",
            "torch",
            "fused",
            "--mode",
            "train",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["implementation"] for r in rows] == ["torch", "fused"]
    assert rows[1]["peak_memory_mb"] is not None
    assert "fused" in capsys.readouterr().out


def test_bad_options():
    with pytest.raises(ValueError, match="implementation"):
        run_benchmark([Shape(batch=2, seq_len=2, hidden=8, rank=2)], implementations=["cudnn"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--shape", "B=x"], "argument --shape: bad shape item 'B=x': B must be an integer"),
        (["--shape", "B=0"], "argument --shape: shape B=0 "),
        (["--shape", "T=-3"], "T=-3 must be >= 1"),
        (["--shape", "H=64,k=64"], "k=64 must be in [1, 64)"),
        (["--shape", "Q=1"], "use KEY=VALUE with KEY in B, T, H, I, L, r, k"),
        (["--shape", ""], "empty shape"),
        (["--runs", "0"], "argument --runs: must be >= 1, got 0"),
        (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N, got 'tpu'"),
        (["--impl", "cudnn"], "argument --impl: invalid choice: 'cudnn'"),
    ],
)
def test_every_bad_value_is_a_clear_error(capsys, argv, fragment):
    with pytest.raises(SystemExit) as excinfo:
        main(["benchmark", *argv])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_benchmark_json_folder_must_exist_before_timing(capsys, tmp_path):
    missing = str(tmp_path / "no" / "x.json")
    code = main(["benchmark", "--shape", "B=1,T=1,H=4,k=none", "--json", missing])
    assert code == 2
    out, err = capsys.readouterr()
    assert "--json" in err and "does not exist" in err
    assert "median" not in out  # nothing was timed


def test_torch_loop_and_tf32_options():
    """The old torch-ops loop is pinned as its own row; tf32 is float32 with TF32 allowed
    only during the run."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    results = run_benchmark(
        [Shape(batch=2, seq_len=3, hidden=8, rank=2)],
        implementations=["torch", "torch-loop"],
        modes=["train"],
        runs=1,
        warmup=0,
        dtype="tf32",
        memory=False,
        log=lambda line: None,
    )
    assert [r.implementation for r in results] == ["torch", "torch-loop"]
    assert results[1].dtype == "tf32"
    assert torch.backends.cuda.matmul.allow_tf32 == before
    from moglstm.benchmark import build

    module = build("torch-loop", Shape(batch=2, seq_len=3, hidden=8, rank=2), "cpu", torch.float32)
    assert module.backend_for(None).name == "torch-loop"
