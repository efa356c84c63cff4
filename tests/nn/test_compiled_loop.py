"""The compiled step loop: rows split across threads, and the BLAS it finds in torch."""

import ctypes
import ctypes.util

import pytest
import torch

from moglstm.nn import _kernels
from tests.nn.test_fused import assert_twins_agree, inputs, twins


@pytest.fixture
def compiled_loop():
    """Skip where the compiled loop cannot run (no C compiler, no BLAS entry points)."""
    if not _kernels.loop_available(torch.zeros(1)):
        pytest.skip("no C compiler or no BLAS entry points in torch: no compiled loop here")


@pytest.mark.parametrize(
    "slices", [[(0, 17)], [(0, 8), (8, 17)], [(0, 1), (1, 9), (9, 12), (12, 17)]]
)
@pytest.mark.usefixtures("compiled_loop")
def test_compiled_loop_splits_batch_rows_across_threads(monkeypatch, slices):
    """Each thread runs its own rows through the whole window; any split gives the same."""
    monkeypatch.setattr(_kernels, "row_slices", lambda batch: slices)
    ref, fused = twins(
        input_size=5,
        hidden_size=4,
        num_layers=2,
        mogrify_rounds=5,
        mogrify_rank=2,
        peephole=True,
        state_dropout=0.3,
    )
    x, hx = inputs(5, 2, B=17)
    assert_twins_agree(ref, fused, x, hx, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("rounds, rank", [(0, None), (3, None), (5, 6)])
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.usefixtures("compiled_loop")
def test_compiled_loop_shares_hidden_units_and_columns(monkeypatch, rounds, rank, threads):
    """With several threads the gates run on each thread's share of the hidden units (and
    of the input-gradient columns), in blocks of 16: H=40 gives 3 shares, a 4th thread none."""
    bounds = [9 * i // threads for i in range(threads + 1)]
    slices = list(zip(bounds[:-1], bounds[1:], strict=True))
    monkeypatch.setattr(_kernels, "row_slices", lambda batch: slices)
    ref, fused = twins(
        input_size=24,
        hidden_size=40,
        num_layers=2,
        mogrify_rounds=rounds,
        mogrify_rank=rank,
        coupled=rounds == 3,
        state_dropout=0.3,
    )
    x, hx = inputs(24, 2, B=9, hidden=40)
    assert_twins_agree(ref, fused, x, hx, rtol=1e-11, atol=1e-11)


def test_row_slices_follow_the_thread_count(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert _kernels.row_slices(64) == [(0, 21), (21, 42), (42, 64)]
    assert _kernels.row_slices(2) == [(0, 1), (1, 2)]  # at most one thread a row


def test_compiled_loop_needs_a_working_blas(monkeypatch):
    _kernels.blas.cache_clear()
    try:
        monkeypatch.setattr(_kernels, "_torch_library", lambda: None)
        assert not _kernels.loop_available(torch.zeros(1))
        _kernels.blas.cache_clear()
        if _kernels.load() is not None:  # the self-check refuses a gemm that computes garbage
            monkeypatch.setattr(_kernels, "_torch_library", lambda: _FakeTorch())
            assert _kernels.blas() is None
    finally:
        _kernels.blas.cache_clear()


class _FakeTorch:
    """A 'libtorch' whose gemms are libc's abs (callable, wrong): the self-check fails."""

    def __getattr__(self, name):
        if name in ("sgemm_", "dgemm_"):
            return ctypes.CDLL(ctypes.util.find_library("c")).abs
        raise AttributeError(name)


@pytest.mark.parametrize("T, B", [(1, 1), (1, 4), (5, 1)])
def test_compiled_loop_single_step_or_row(T, B):
    """Size-1 dimensions leave strides free; the row strides handed to BLAS must still hold."""
    ref, fused = twins(
        input_size=5,
        hidden_size=4,
        num_layers=2,
        mogrify_rounds=5,
        mogrify_rank=2,
        bidirectional=True,
    )
    x, hx = inputs(5, 4, T=T, B=B)
    assert_twins_agree(ref, fused, x, hx, rtol=1e-11, atol=1e-11)


@pytest.mark.usefixtures("compiled_loop")
def test_compiled_loop_survives_a_thread_that_cannot_start(monkeypatch):
    """Threads already waiting at the first barrier give up instead of hanging."""
    import threading

    real_start, calls = threading.Thread.start, []

    def start(self):
        calls.append(self)
        if len(calls) == 2:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(_kernels, "row_slices", lambda batch: [(0, 1), (1, 2), (2, 3)])
    monkeypatch.setattr(threading.Thread, "start", start)
    _, fused = twins(input_size=5, hidden_size=4, num_layers=1, mogrify_rounds=2)
    x, hx = inputs(5, 1)
    with pytest.raises(RuntimeError, match="start new thread"):
        fused(x, hx)


def test_struct_layout_matches_the_c_side(compiled_loop):
    lib = _kernels.load()
    for which, mirror in enumerate((_kernels.Layer, _kernels.Blas)):
        size, fields = _kernels.struct_layout(lib, which)
        assert size == ctypes.sizeof(mirror)
        assert [name for name, _ in fields] == [name for name, *_ in mirror._fields_]
    assert lib.mog_forward_f32.restype is ctypes.c_int
    assert lib.lstm_fwd_f64.argtypes is not None


def test_loader_refuses_a_mismatched_struct(compiled_loop, monkeypatch):
    class Shifted(ctypes.Structure):  # one field missing: every later offset moves
        _fields_ = _kernels.Layer._fields_[:-2] + _kernels.Layer._fields_[-1:]

    monkeypatch.setattr(_kernels, "Layer", Shifted)
    with pytest.raises(RuntimeError, match="does not match its ctypes mirror"):
        _kernels.check_layout(_kernels.load())


def test_layer_refuses_non_contiguous_buffers():
    gates = torch.zeros(4, 3, 8).transpose(0, 1)
    with pytest.raises(ValueError, match="gates must be contiguous"):
        _kernels.Layer.make({"gates": gates}, {}, {})
    with pytest.raises(ValueError, match="xs: the C loop needs"):
        _kernels.Layer.make({}, {}, {"xs": [torch.zeros(4, 3, 8).transpose(0, 1)]})
    with pytest.raises(ValueError, match="rows of unit stride"):
        _kernels.round_forward(torch.zeros(3, 4), torch.zeros(4, 3).t(), torch.zeros(3, 4))
