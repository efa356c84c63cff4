"""tests/processes.py: a child that times out is ended with everything it started."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import processes

# a child that starts a grandchild, says its pid, and both hang
_PARENT = (
    "import subprocess, sys, time\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(g.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_timeout_ends_the_grandchildren_too():
    with pytest.raises(subprocess.TimeoutExpired) as info:
        processes.run([sys.executable, "-c", _PARENT], capture_output=True, text=True, timeout=3)
    grandchild = int(info.value.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_run_returns_like_subprocess_run():
    done = processes.run(
        [sys.executable, "-c", "import sys; print(sys.stdin.read()); sys.exit(3)"],
        input="hi",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3 and done.stdout == "hi\n"
