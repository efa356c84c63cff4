"""Same command, same seed, same machine: the same bits, whatever else the machine does.

See docs/reproducibility.md: the CPU thread count is fixed for a run and the thread
libraries may not adapt it to the load, so every sum split over threads is split the same
way in every run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import sys
import time

import pytest
import torch

from moglstm.lm.runtime import _torch_symbol, fix_cpu_threads
from moglstm.lm.train import train
from tests.lm.test_train import assert_same_checkpoint, comparable, make_cfg, read_metrics
from tests.processes import started

# two busy processes (one forks the other; both die with the group): the cores are shared
_LOAD = "import os\nos.fork()\nwhile True: pass"


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _two_thread_cfg(word_data_config, tmp_path, name):
    cfg = make_cfg(word_data_config, tmp_path, name, max_steps=6, eval_every=3, threads=2)
    # a batch of 4 streams: the compiled step loop splits it between both threads
    # and 32 hidden units, two blocks of 16 for the gates
    model = dataclasses.replace(cfg.model, hidden_size=32)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4), model=model)


def test_the_same_training_gives_the_same_bits_while_another_process_loads_the_cpu(
    word_data_config, tmp_path, restore_threads
):
    quiet = train(_two_thread_cfg(word_data_config, tmp_path, "quiet"), quiet=True)
    with started([sys.executable, "-c", _LOAD]) as load:
        time.sleep(0.2)  # the load is running before training starts
        busy = train(_two_thread_cfg(word_data_config, tmp_path, "busy"), quiet=True)
        assert load.poll() is None  # it loaded the CPU all along
    assert_same_checkpoint(tmp_path / "quiet" / "last.pt", tmp_path / "busy" / "last.pt")
    assert comparable(read_metrics(tmp_path / "quiet")) == comparable(
        read_metrics(tmp_path / "busy")
    )
    assert quiet["valid_loss"] == busy["valid_loss"]


def test_the_thread_count_is_fixed_and_not_adapted_to_the_load(restore_threads):
    assert fix_cpu_threads(1) == 1 and torch.get_num_threads() == 1
    assert fix_cpu_threads(None) == 1  # None keeps the count the process has
    assert fix_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    omp_get_dynamic = _torch_symbol("omp_get_dynamic")
    if omp_get_dynamic is None:
        pytest.skip("torch's CPU library exports no OpenMP runtime here")
    omp_get_dynamic.restype = ctypes.c_int
    assert omp_get_dynamic() == 0


def test_a_resume_on_another_thread_count_says_the_bits_will_differ(
    word_data_config, tmp_path, restore_threads, caplog
):
    cfg = _two_thread_cfg(word_data_config, tmp_path, "run")
    train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)), quiet=True)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["counters"]["threads"] == 2
    one = dataclasses.replace(cfg.train, threads=1)
    with caplog.at_level(logging.WARNING, logger="moglstm"):
        train(dataclasses.replace(cfg, train=one), resume=True, quiet=True)
    assert "trained on 2 CPU threads and goes on with 1" in caplog.text
    assert "train.threads=2" in caplog.text


def test_the_triton_self_check_draws_nothing_from_the_global_generator():
    """On CUDA it runs at a run's first step, so again after a resume: a draw from the
    global generator would shift every later dropout mask of the resumed run."""
    from moglstm.nn.backends.triton import self_check_problem

    before = torch.get_rng_state()
    first = self_check_problem(torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
    again = self_check_problem(torch.device("cpu"), torch.float32)
    for a, b in zip(first[0].parameters(), again[0].parameters(), strict=True):
        assert torch.equal(a, b)  # the same problem every time
