"""Run a command in its own process group with a hard timeout, and end that group
whatever happens (the benchmark scripts' children: pytest, the barrier probe)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def run_group(args: list[str], timeout_s: float, **kwargs) -> tuple[int | str, str, str]:
    """``(returncode or "timeout", stdout, stderr)``; the group is killed at the end."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=max(timeout_s, 1))
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        rc = "timeout"
    finally:
        _kill(proc)
    return rc, out or "", err or ""


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
