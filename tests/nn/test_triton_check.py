"""Every Triton kernel configuration is checked before it trains (triton_check), on CPU.

Under Triton's interpreter the checked dispatch runs as it would on CUDA: each layer
direction's configuration is compared with the torch path on its first window; a wrong
kernel (patched in) warns once naming the configuration and that configuration falls
back; verdicts are per precision; inside an outer capture the check waits; the first
check on a device runs in a child process, whose crash, abort or hang becomes a warning
and the torch path (stand-in children here; the real child in a slow test).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import pytest
import torch

from moglstm.nn import MogrifierLSTM, backends
from moglstm.nn.backends import triton as tb
from moglstm.nn.backends import triton_check as tc
from moglstm.nn.direction import Steps

pytest.importorskip("triton")
pytest.importorskip("numpy")
if not tb.interpreting():
    pytest.skip("these run the kernels under TRITON_INTERPRET=1 on CPU", allow_module_level=True)


def window(dtype=torch.float32, B=2, mask=False, **kwargs):
    """A direction of a tiny layer and its inputs ``(steps, h, c, d, reverse, mask)``."""
    torch.manual_seed(0)
    kwargs = {"mogrify_rounds": 2, "mogrify_rank": 3, **kwargs}
    layer = MogrifierLSTM(5, 6, **kwargs).to(dtype)
    d = layer.direction(0, 0)
    x = torch.randn(2, B, 5, dtype=dtype, requires_grad=True)
    h, c = (torch.randn(B, 6, dtype=dtype) for _ in range(2))
    m = (torch.rand(B, 6) > 0.5).to(dtype) * 2 if mask else None
    return Steps(x, None), h, c, d, False, m


def reference(steps, h, c, d, reverse, m):
    return backends.REFERENCE.run(steps, h, c, d, reverse, m)


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setattr(tc, "CHILD_CHECK", "0")  # in-process checks unless a test says
    return tc.CheckedTriton(lambda x: backends.TORCH_LOOP)


def ran(ct) -> list[str]:
    return [name for (name, _), n in ct.ran.items() for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_right_window_passes(dtype):
    steps, h, c, d, reverse, m = window(dtype, mask=True)
    passed, what = tc.compare_window(d.spec, steps.x, h, c, m, d.flat(), reverse)
    assert passed, what


def test_first_window_checked_once_then_triton(checked, caplog):
    args = window()
    with caplog.at_level("INFO", logger=tc.__name__), warnings.catch_warnings():
        warnings.simplefilter("error")
        out, hn, cn = checked.run(*args)
        checked.run(*args)
    assert list(checked.verdicts.values()) == [True]
    assert ran(checked) == ["triton", "triton"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("compiling GPU kernels for float32, once; cached afterwards" in m for m in messages)
    assert any("compiled and checked in" in m for m in messages)
    torch.testing.assert_close(out, reference(*args)[0], rtol=2e-5, atol=2e-5)


def test_implementation_triton_logs_its_first_compile(caplog, monkeypatch):
    monkeypatch.setattr(tb, "ANNOUNCED", set())
    args = window()
    with caplog.at_level("INFO", logger=tb.__name__):
        tb.TRITON.run(*args)
        tb.TRITON.run(*args)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "moglstm: compiling GPU kernels for float32, once; cached afterwards"
    assert messages[1].startswith("moglstm: first float32 forward window in ")
    assert len(messages) == 2  # once


def test_a_wrong_kernel_warns_once_naming_its_configuration_and_falls_back(checked, monkeypatch):
    original = tb.gates_cell

    def wrong(*args):
        original(*args)
        args[8].mul_(1.01)  # h of the step: 1% off

    monkeypatch.setattr(tb, "gates_cell", wrong)
    args = window()
    with pytest.warns(RuntimeWarning, match=r"failed its check for configuration float32 \(ieee"):
        out, hn, cn = checked.run(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        out2, _, _ = checked.run(*args)
    assert list(checked.verdicts.values()) == [False]
    assert ran(checked) == ["torch-loop", "torch-loop"]
    want = reference(*args)[0]
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)  # the fallback is right
    torch.testing.assert_close(out2, want, rtol=2e-5, atol=2e-5)
    # another configuration (the batch tile of 64 rows) is checked on its own
    monkeypatch.setattr(tb, "gates_cell", original)
    checked.run(*window(B=17))
    assert sorted(checked.verdicts.values()) == [False, True]


def test_a_wrong_gradient_fails_the_check(checked, monkeypatch):
    original = tb.cell_backward

    def wrong(spec, gates, c_prev, c, dh, d_out, dc, peephole):
        original(spec, gates, c_prev, c, dh, d_out, dc, peephole)
        dc.mul_(1.05)

    monkeypatch.setattr(tb, "cell_backward", wrong)
    with pytest.warns(RuntimeWarning, match="d c0|d x|d h0|d weight"):
        checked.run(*window())
    assert list(checked.verdicts.values()) == [False]


def test_verdicts_are_per_precision_not_per_dtype(checked, monkeypatch):
    args = window()
    checked.run(*args)
    monkeypatch.setattr(tb, "precision", lambda dtype: "tf32")  # TF32 switched on later
    checked.run(*args)
    assert sorted(c.precision for c in checked.verdicts) == ["ieee-float32", "tf32-float32"]


def test_configuration_names_what_picks_the_binaries():
    steps, h, c, d, _, m = window(B=16, mask=True)
    base = tc.config_of(d.spec, steps.x, h, c, None, d.flat())
    assert base.batch_tile == 16 and base.rounds == ("low-rank/32", "low-rank/32")
    assert tc.config_of(d.spec, steps.x, h, c, m, d.flat()) != base  # the state mask
    steps17, h17, c17, *_ = window(B=17)
    other = tc.config_of(d.spec, steps17.x, h17, c17, None, d.flat())
    assert other.batch_tile == 64 and other.sizes != base.sizes
    x_unaligned = torch.empty(2 * 16 * 5 + 1)[1:].view(2, 16, 5)  # 4 bytes off
    assert tc.config_of(d.spec, x_unaligned, h, c, None, d.flat()).aligned != base.aligned
    assert "float32 (ieee-float32)" in str(base) and "batch tile 16" in str(base)


def test_inside_an_outer_capture_the_check_waits(checked, monkeypatch):
    monkeypatch.setattr(tc, "deferred", lambda x: True)
    args = window()
    checked.run(*args)
    assert not checked.verdicts and ran(checked) == ["torch-loop"]  # nothing cached as failed
    monkeypatch.setattr(tc, "deferred", lambda x: False)
    checked.run(*args)
    assert list(checked.verdicts.values()) == [True]


def test_the_check_waits_under_a_transform_or_a_tracer():
    x = torch.randn(2, 2, 5)
    assert not tc.deferred(x)
    seen = []

    def f(v):
        seen.append(tc.deferred(v))
        return v.sum()

    torch.func.grad(f)(x)
    torch.jit.trace(lambda v: seen.append(tc.deferred(v)) or v * 2, (x,), check_trace=False)
    with torch.inference_mode():  # no gradients to compare: waits, caches no failure
        seen.append(tc.deferred(torch.randn(2, 2, 5)))
    assert seen and all(seen), seen


def test_self_check_is_cached_per_precision_and_not_inside_a_capture(monkeypatch):
    calls = []
    one = torch.ones(1)
    monkeypatch.setattr(tb, "_run_both", lambda *a: calls.append(1) or [(one, one)])
    monkeypatch.setattr(tb, "self_check_problem", lambda device, dtype: (None, one, None))
    tb.checked_problem.cache_clear()
    try:
        assert tb.self_check("cpu", torch.float32)
        assert tb.self_check("cpu", torch.float32) and len(calls) == 1
        monkeypatch.setattr(tb, "precision", lambda dtype: "tf32")  # TF32 switched on
        assert tb.self_check("cpu", torch.float32) and len(calls) == 2
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert not tb.self_check("cuda", torch.float32)
        assert len(calls) == 2  # nothing run, nothing cached: a later call checks
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        assert tb.self_check("cuda", torch.float32) and len(calls) == 3
    finally:
        tb.checked_problem.cache_clear()


# -- the first check on a device, in a child process


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("import os; os.abort()", "SIGABRT"),
        ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
        ("import sys; print('CUDA error: an illegal memory access', file=sys.stderr); "
         "sys.exit(1)", "illegal memory access"),
    ],
    ids=["abort", "segfault", "error-exit"],
)
def test_a_crashing_child_means_a_warning_and_the_torch_path(checked, monkeypatch, code, why):
    monkeypatch.setattr(tc, "CHILD_CHECK", "1")
    monkeypatch.setattr(tc, "CHILD_COMMAND", [sys.executable, "-c", code])
    args = window()
    with pytest.warns(RuntimeWarning, match=f"crashed in a child process.*{why}"):
        out, _, _ = checked.run(*args)
    torch.testing.assert_close(out, reference(*args)[0], rtol=2e-5, atol=2e-5)
    assert not checked.device_usable(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checked.run(*window(B=17))  # another configuration on that device: no new child
    assert ran(checked) == ["torch-loop", "torch-loop"]


def test_a_child_that_finds_a_mismatch_fails_the_configuration(checked, monkeypatch):
    answer = json.dumps({"passed": False, "what": "output: relative error 3e-1"})
    monkeypatch.setattr(tc, "CHILD_CHECK", "1")
    monkeypatch.setattr(tc, "CHILD_COMMAND", [sys.executable, "-c", f"print({answer!r})"])
    with pytest.warns(RuntimeWarning, match="failed its check.*relative error 3e-1"):
        checked.run(*window())
    assert list(checked.verdicts.values()) == [False]
    assert checked.device_usable(torch.device("cpu"))  # the device itself is fine


def test_a_hanging_child_is_ended_with_its_process_group(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    monkeypatch.setattr(tc, "CHILD_COMMAND", [sys.executable, "-c", code])
    start = time.monotonic()
    verdict, what = tc.run_child({}, timeout_s=2)
    assert verdict == "fault" and "no answer within 2 s" in what
    assert time.monotonic() - start < 20
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the group was killed: the grandchild goes (reaped by init)
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the child's own child outlived it")


@pytest.mark.slow
def test_the_real_child_checks_the_configuration_under_the_interpreter(monkeypatch):
    """``python -m moglstm.nn.backends.triton_child`` rebuilds the configuration (state
    mask, peepholes) and passes; its answer is what the parent reads."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    steps, h, c, d, reverse, m = window(mask=True, peephole=True)
    request = tc.child_request(d.spec, steps.x, m, reverse)
    verdict, what = tc.run_child(request, timeout_s=300)
    assert verdict == "pass", what


def test_auto_through_the_module_falls_back_on_a_wrong_kernel(monkeypatch):
    """``MogrifierLSTM(implementation="auto")`` as on a CUDA device (readiness forced):
    a wrong kernel warns once and the layer still trains right, on the torch-ops loop."""
    monkeypatch.setattr(backends, "_triton_ready", lambda x: True)
    monkeypatch.setattr(backends.CHECKED_TRITON, "verdicts", {})
    monkeypatch.setattr(tc, "CHILD_CHECK", "0")
    original = tb.gates_cell

    def wrong(*args):
        original(*args)
        args[8].mul_(1.01)

    monkeypatch.setattr(tb, "gates_cell", wrong)
    torch.manual_seed(0)
    rnn = MogrifierLSTM(5, 6, num_layers=2, mogrify_rounds=2, mogrify_rank=3)
    ref = MogrifierLSTM(5, 6, num_layers=2, mogrify_rounds=2, mogrify_rank=3)
    ref.implementation = "reference"
    ref.load_state_dict(rnn.state_dict())
    x = torch.randn(3, 2, 5)
    with pytest.warns(RuntimeWarning, match="failed its check for configuration") as seen:
        out, _ = rnn(x)
    # the two layers (inputs 5 and 6) run the same binaries: one configuration, one check
    assert len([w for w in seen if "failed its check" in str(w.message)]) == 1
    torch.testing.assert_close(out, ref(x)[0], rtol=2e-5, atol=2e-5)
    assert list(backends.CHECKED_TRITON.verdicts.values()) == [False]
