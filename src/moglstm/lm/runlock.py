"""One run per run folder: an exclusive operating-system lock on ``<run folder>/.lock``.

Two training processes writing the same run folder would interleave their metric
lines and overwrite each other's checkpoints. :class:`RunLock` takes an exclusive
:func:`fcntl.flock` on the file ``.lock`` in the folder for as long as training runs;
a second process asking for it gets a :class:`RunLockedError` naming the process
that holds it.

The kernel drops the lock when the holder exits, however it exits (``SIGKILL``
included), so a crashed run never leaves a stale lock behind; the ``.lock`` file
itself stays (it is empty of meaning once unlocked). It is opened without
following a symbolic link (:func:`~moglstm.lm.safety.open_regular`): a run folder
from elsewhere cannot make the lock truncate a file outside it. On platforms without
:mod:`fcntl` (Windows) the lock is not taken and a warning says so. ``flock`` is
reliable on local file systems; on network file systems it may only exclude
processes of the same machine.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from moglstm.lm.errors import UserError
from moglstm.lm.safety import open_regular

__all__ = ["LOCK_FILE", "RunLock", "RunLockedError"]

#: Name of the lock file inside a run folder.
LOCK_FILE = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another process is using the run folder (it holds the folder's lock)."""


class RunLock:
    r"""Exclusive lock on a run folder, held from :meth:`acquire` to :meth:`release`.

    Use it as a context manager::

        with RunLock("runs/ptb-small"):
            ...  # only this process writes runs/ptb-small/

    Args:
        run_dir: the run folder; it is created if missing.

    Raises:
        RunLockedError: (from :meth:`acquire`) another process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        if not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir: expected a path, got {type(run_dir).__name__}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock without waiting; returns ``self``.

        Raises:
            RunLockedError: another process holds it; the message names the holder.
            UnsafePathError: ``.lock`` is a symbolic link or not a regular file.
        """
        if self._fd is not None:
            return self
        if fcntl is None:
            warnings.warn(
                f"cannot lock {str(self.run_dir)!r} on this platform: make sure no other run "
                "uses the same folder",
                stacklevel=2,
            )
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)  # never a planted link or FIFO
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"run folder {str(self.run_dir)!r} is in use by another moglstm process"
                f"{holder}; wait for it to finish (or stop it), or use another run name"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _write_holder(fd)
        return self

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # the holder's details no longer apply
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, locked={self.locked})"


def _write_holder(fd: int) -> None:
    """Record who holds the lock, for the message a second process shows."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)
    except OSError:  # the details are a courtesy; the lock is what matters
        pass


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""
