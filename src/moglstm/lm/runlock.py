"""One run per run folder: an exclusive operating-system lock on the run folder itself.

Two training processes writing the same run folder would interleave their metric
lines and overwrite each other's checkpoints. :class:`RunLock` takes an exclusive
:func:`fcntl.flock` on the **folder** (a descriptor of the directory opened before
anything in it is checked) for as long as training runs; a second process asking for
it gets a :class:`RunLockedError` naming the process that holds it (its pid and start
time). Because the lock lives on the folder, not on a file in it, deleting or
replacing any file in the folder (``.lock`` included) cannot let a second writer in.

The holder's details are written to ``.lock`` in the folder, for the message a second
process shows; if that file was deleted, the holder is found in ``/proc/locks``
instead. Before every write of ``last.pt``, ``best.pt`` and ``metrics.jsonl``, the
training loop calls :func:`check_writer`, which checks that the path of the run folder
still names the folder this process locked: a folder deleted or swapped for another
while the run trained stops the run with one line, and nothing is written into the
new folder (which another run may hold).

The kernel drops the lock when the holder exits, however it exits (``SIGKILL``
included), so a crashed run never leaves a stale lock behind. ``.lock`` is opened
without following a symbolic link (:func:`~moglstm.lm.safety.open_regular`): a run
folder from elsewhere cannot make the lock truncate a file outside it. On platforms
without :mod:`fcntl` (Windows) the lock is not taken and a warning says so. ``flock``
is reliable on local file systems; on network file systems it may only exclude
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

__all__ = [
    "LOCK_FILE",
    "RunFolderChangedError",
    "RunLock",
    "RunLockedError",
    "check_writer",
    "is_locked",
]

#: Name of the file inside a run folder that tells who holds the folder's lock.
LOCK_FILE = ".lock"

#: The locks this process holds, by absolute folder path (for :func:`check_writer`).
_HELD: dict[str, RunLock] = {}


class RunLockedError(UserError, RuntimeError):
    """Another process is using the run folder (it holds the folder's lock)."""


class RunFolderChangedError(UserError, RuntimeError):
    """The run folder was removed or replaced while this process held its lock."""


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
        self._fd: int | None = None  # the folder's descriptor, which holds the flock
        self._key = os.path.abspath(self.run_dir)

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
        fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.path, os.fstat(fd))
            os.close(fd)
            raise RunLockedError(
                f"run folder {str(self.run_dir)!r} is in use by another moglstm process"
                f"{holder}; wait for it to finish (or stop it), or use another run name"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            _write_holder(self.path)  # never a planted link or FIFO
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD[self._key] = self
        return self

    def check(self) -> None:
        """Raise :class:`RunFolderChangedError` unless this lock is held and the run
        folder's path still names the folder it locked (call before writing in it)."""
        if fcntl is None:
            return
        if self._fd is None:
            raise RunFolderChangedError(f"run folder {str(self.run_dir)!r} is not locked")
        held = os.fstat(self._fd)
        try:
            now = os.stat(self.run_dir)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise RunFolderChangedError(
                f"run folder {str(self.run_dir)!r} was removed or replaced while this run "
                "was training in it; stopping without writing there (the folder there now "
                "may belong to another run)"
            )

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if _HELD.get(self._key) is self:
            del _HELD[self._key]
        try:
            if self._same_folder(fd):
                _clear_holder(self.path)  # the holder's details no longer apply
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def owns_folder(self) -> bool:
        """Whether this lock is held and the run folder's path still names its folder."""
        return self._fd is not None and self._same_folder(self._fd)

    def _same_folder(self, fd: int) -> bool:
        try:
            a, b = os.fstat(fd), os.stat(self.run_dir)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

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


def check_writer(run_dir: str | os.PathLike) -> None:
    """Before writing a file in ``run_dir``: if this process locked it, check that it
    still holds that very folder (see :meth:`RunLock.check`); else do nothing.

    Raises:
        RunFolderChangedError: the folder was removed or replaced since it was locked.
    """
    lock = _HELD.get(os.path.abspath(run_dir))
    if lock is not None:
        lock.check()


def is_locked(run_dir: str | os.PathLike) -> bool:
    """Whether some process holds ``run_dir``'s lock (never waits, never creates it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def _write_holder(path: Path) -> None:
    """Record who holds the lock, for the message a second process shows."""
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    text = f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"
    fd = open_regular(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode("utf-8"), 0)
    except OSError:  # the details are a courtesy; the lock is what matters
        pass
    finally:
        os.close(fd)


def _clear_holder(path: Path) -> None:
    try:
        fd = open_regular(path, os.O_WRONLY)
    except (OSError, UserError):
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def _holder(path: Path, folder: os.stat_result) -> str:
    """`` (pid N on HOST, since TIME)`` from ``.lock``, else from ``/proc/locks``."""
    try:
        fd = open_regular(path, os.O_RDONLY)
        try:
            text = os.pread(fd, 200, 0).decode("utf-8", errors="replace").strip()
        finally:
            os.close(fd)
    except (OSError, UserError):
        text = ""
    if not text:
        text = _holder_from_proc(folder)
    return f" ({text})" if text else ""


def _holder_from_proc(folder: os.stat_result, proc: str = "/proc") -> str:
    """The holder of the flock on ``folder`` as the kernel lists it (Linux), or ``""``."""
    device = f"{os.major(folder.st_dev):02x}:{os.minor(folder.st_dev):02x}:{folder.st_ino}"
    try:
        with open(f"{proc}/locks", encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            pid = fields[4]
            return f"pid {pid}{_process_start(pid, proc)}"
    return ""


def _process_start(pid: str, proc: str = "/proc") -> str:
    """``, since TIME`` for process ``pid`` (from its start time in ``/proc``), or ``""``."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as f:
            ticks = int(f.read(4096).rsplit(")", 1)[1].split()[19])
        with open(f"{proc}/stat", encoding="ascii", errors="replace") as f:
            boot = next(int(x.split()[1]) for x in f if x.startswith("btime"))
        started = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return ""
    return ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
