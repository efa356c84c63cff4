"""Child processes for tests, each ended with its whole process group.

A test that starts a program may time out or fail while the program still runs, and the
program may have started its own children (workers of a benchmark, torchrun's ranks, a
tuning study's trials). ``subprocess.run(timeout=...)`` kills the child alone and leaves
the grandchildren running; here every child starts a new session (its own process
group), and the group is killed on a timeout, on any error, and when the test is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["kill_group", "run", "started"]


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL ``process``'s process group (a no-op once it is gone) and reap ``process``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def started(command: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """``Popen(command, **kwargs)`` in its own process group, killed with it on exit."""
    process = subprocess.Popen(command, start_new_session=True, **kwargs)
    try:
        yield process
    finally:
        kill_group(process)


def run(command: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(command, timeout=timeout, **kwargs)`` (``check`` is not taken), but a
    timeout ends the process group and raises ``subprocess.TimeoutExpired`` with the output
    so far. Whatever the program left running when it ended is killed too."""
    if kwargs.pop("check", False):
        raise TypeError("run(): check the returncode in the test")
    if kwargs.pop("capture_output", False):
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdin = kwargs.pop("input", None)
    if stdin is not None:
        kwargs["stdin"] = subprocess.PIPE
    with started(command, **kwargs) as process:
        try:
            out, err = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            kill_group(process)
            out, err = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, out, err) from exc
    return subprocess.CompletedProcess(command, process.returncode, out, err)
