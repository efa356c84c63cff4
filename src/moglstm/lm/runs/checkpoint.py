"""Checkpoints: plain-data snapshots that rebuild a run alone, written atomically.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python
data (dicts, lists, tuples, str, numbers, bools, None), so that
``torch.load(path, weights_only=True)`` reads it without running any pickled
code. The training loop builds the
payload, a :class:`~moglstm.lm.runs.payload.CheckpointPayload`; its keys are listed at
the end of this text (generated from :data:`~moglstm.lm.runs.payload.PAYLOAD_KEYS`).

:func:`save_checkpoint` writes to a temporary file in the destination folder,
flushes and fsyncs it, reads it back to check every member's CRC-32, renames it
over the destination with :func:`os.replace` and fsyncs the folder, so a crash or
a full disk never leaves a partial file at the destination and never damages the
checkpoint already there. With ``keep_previous=True`` the checkpoint it replaces
(if it verifies) is kept as ``NAME.prev.pt`` (:func:`previous_path`): it is
hard-linked (copied where links are not supported) to that name *before* the new
file is renamed over it, so ``NAME.pt`` exists at every moment. And
:func:`load_newest_checkpoint` falls back to the previous one when the newest is
missing, truncated, corrupt or inconsistent, so a run always has a good checkpoint
to resume from.

:func:`load_checkpoint` opens the file without following a symbolic link, checks
the CRC-32 of every member before unpickling (a flipped bit in tensor data would
otherwise load silently) and unpickles with ``weights_only=True``, so a crafted
file cannot run code.
:func:`~moglstm.lm.runs.payload.check_training_checkpoint` then checks the parts
against each other before anything is built from them: the config is plain data
of a config's size, valid; every weight has the name, shape and finite values
that the config's model (built on the ``meta`` device, which allocates nothing)
gives it; the optimizer's moments match the parameters.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.errors import CheckpointError, UserError
from moglstm.lm.runs.payload import describe_payload
from moglstm.lm.safety import (
    ArchiveError,
    UnsafePathError,
    fsync_folder,
    open_run_file,
    short_repr,
    temp_name,
    verify_archive,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "load_newest_checkpoint",
    "previous_path",
    "remove_stale_temp_files",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Leaf types that torch.load(weights_only=True) accepts.
_PLAIN_LEAVES = (
    torch.Tensor,
    str,
    bytes,
    bool,
    int,
    float,
    complex,
    type(None),
    torch.Size,
    torch.dtype,
    torch.device,
)
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple)




# --------------------------------------------------------------------------- saving


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced: ``last.pt`` ->
    ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(
    path: str | os.PathLike,
    payload: dict[str, Any],
    *,
    keep_previous: bool = False,
    verify: bool = True,
) -> Path:
    """Write ``payload`` to ``path`` atomically.

    The payload is written to a temporary file next to ``path``, flushed and
    fsynced, read back to check it (``verify``), then renamed over ``path``
    (:func:`os.replace`), and the folder is fsynced. On any failure the temporary
    file is removed and the error is re-raised (an :class:`OSError` keeps its
    ``errno``, e.g. ``ENOSPC``, and names ``path``); a checkpoint already at
    ``path`` is left intact.

    Args:
        path: destination file; parent folders are created.
        payload: tensors and plain data only (see the module docstring).
            ``format_version`` is added when absent.
        keep_previous: first link the checkpoint at ``path`` to
            :func:`previous_path` (replacing the one there), unless it fails its
            own check (or is a symbolic link), in which case the older one there
            is kept instead. ``path`` itself is replaced only after that, so it
            never goes missing.
        verify: check the CRC-32 of every member of the written file before it
            replaces anything.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: ``payload`` is not a dict or holds something that
            ``torch.load(weights_only=True)`` would refuse (the key is named).
        CheckpointError: the written file failed verification (nothing was replaced).
        OSError: the file could not be written.
    """
    path = Path(path)
    if not isinstance(payload, dict):
        raise TypeError(f"payload: expected a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    version = payload.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise UserError(
            f"payload['format_version']={version!r}, but this moglstm writes format "
            f"{FORMAT_VERSION}"
        )
    payload = {**payload, "format_version": FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        _write_synced(tmp, payload)
        if verify:
            _verify_written(tmp, path)
        if keep_previous:
            _keep_as_previous(path)
        os.replace(tmp, path)
    except BaseException as exc:  # incl. KeyboardInterrupt: never leave the temp file
        _remove_quietly(tmp)
        os_error = _os_error_in(exc)
        if os_error is not None:
            raise OSError(
                os_error.errno,
                f"could not save checkpoint {str(path)!r}: {os_error.strerror or os_error} "
                "(any checkpoint already there is unchanged)",
            ) from exc
        raise
    fsync_folder(path.parent)
    return path


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any.

    A write error inside :func:`torch.save` (e.g. ``ENOSPC``) is often masked by a
    ``RuntimeError`` that the zip writer raises while closing the half-written file.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError naming the first value that weights_only loading would refuse."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if not isinstance(obj, _PLAIN_CONTAINERS):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold "
            "only tensors and plain data (dict, list, tuple, str, numbers, bool, None)"
        )
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    else:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")


def _create_new(tmp: Path) -> Any:
    """Open a new file for binary writing (a seam the disk-full tests replace)."""
    # O_EXCL: the name is fresh, never someone else's file; 0o666 lets the umask decide.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(fd, "wb")


def _write_synced(tmp: Path, payload: dict[str, Any]) -> None:
    with _create_new(tmp) as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _verify_written(tmp: Path, path: Path) -> None:
    try:
        verify_archive(tmp)
    except ArchiveError as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} did not read back intact after writing ({exc}); "
            "it was not installed (any checkpoint already there is unchanged)"
        ) from exc


def _keep_as_previous(path: Path) -> None:
    """Link a good checkpoint at ``path`` to its ``.prev`` name before it is replaced.

    A link, not a rename: ``path`` stays in place until the new file replaces it.
    """
    if not os.path.lexists(path):
        return
    try:
        with open_run_file(path) as f:
            verify_archive(path, f)
    except (ArchiveError, UnsafePathError, PermissionError) as exc:  # keep the good .prev one
        logger.warning("not keeping %s as the previous checkpoint: %s", path, exc)
        return
    previous = previous_path(path)
    tmp = temp_name(previous)
    try:
        try:
            os.link(path, tmp, follow_symlinks=False)
        except OSError:  # a file system without hard links: a copy does as well
            shutil.copyfile(path, tmp, follow_symlinks=False)
        os.replace(tmp, previous)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Opens the file without following a symbolic link (resolve a link you mean to
    follow first), checks the CRC-32 of every member, then loads the same open file
    with ``weights_only=True``: no pickled code runs.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (as in :func:`torch.load`); ``"cpu"`` by default.

    Returns:
        The payload dict, including ``format_version``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt, unreadable (permissions),
            holds more than plain data, is not a moglstm checkpoint, comes from a newer
            format, or is a symbolic link or not a regular file.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"checkpoint path {str(path)!r} is a folder, not a file")
    try:
        with open_run_file(path) as f:  # no link followed, no FIFO waited on
            verify_archive(path, f)
            f.seek(0)
            payload = torch.load(f, map_location=map_location, weights_only=True)
    except UnsafePathError as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc}") from None
    except ArchiveError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    except PermissionError as exc:  # unreadable is damaged, as far as a fallback goes
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: {exc.strerror or 'permission denied'}"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a moglstm checkpoint: it is corrupt or holds objects other "
            f"than tensors and plain data ({_reason(exc)})"
        ) from exc
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, IndexError) as exc:
        # A cut-off zip archive surfaces as RuntimeError, EOFError or even OSError(EINVAL).
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is truncated, corrupt or not "
            f"a checkpoint ({_reason(exc)})"
        ) from exc
    return _check_payload(payload, path)


Check = Callable[[dict[str, Any], Path], None]


def load_newest_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    check: Check | None = None,
) -> tuple[dict[str, Any], Path]:
    """Read ``path``, or the previous checkpoint kept beside it when ``path`` is bad.

    Tries ``path`` and then :func:`previous_path` (written by :func:`save_checkpoint`
    with ``keep_previous=True``); a missing, truncated, corrupt or (by ``check``)
    inconsistent file is skipped with a warning that names it and says why. Each
    warning is given once per process for the same file, however often it is read.

    Args:
        path: the newest checkpoint, e.g. ``<run>/last.pt``.
        map_location: as in :func:`load_checkpoint`.
        check: called as ``check(payload, path)``; a :class:`CheckpointError` it
            raises rejects the file like damage does (e.g.
            :func:`~moglstm.lm.runs.payload.check_training_checkpoint`).

    Returns:
        ``(payload, the path it was read from)``.

    Raises:
        FileNotFoundError: neither file exists.
        CheckpointError: no candidate could be read; every failure is listed.
    """
    path = Path(path)
    candidates = [path, previous_path(path)]
    if not any(os.path.lexists(c) for c in candidates):
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    failures: list[tuple[Path, CheckpointError]] = []
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        try:
            payload = load_checkpoint(candidate, map_location)
            if check is not None:
                check(payload, candidate)
        except CheckpointError as exc:
            failures.append((candidate, exc))
            continue
        for bad, exc in failures:  # warned only when there is a fallback: else the error says it
            _warn_once(bad, "skipping checkpoint %s: %s", bad, exc)
        if failures:
            _warn_once(candidate, "falling back to the previous checkpoint %s", candidate)
        return payload, candidate
    raise CheckpointError("no readable checkpoint: " + "; ".join(str(e) for _, e in failures))


_warned: set[tuple] = set()


def _warn_once(path: Path, message: str, *args: Any) -> None:
    """Log a warning about ``path`` unless this process gave it already for that file."""
    try:
        st = os.lstat(path)
        key = (message, str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        key = (message, str(path))
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


#: For other modules: a warning about a run-folder file, given once per process per file.
warn_once = _warn_once


#: Temporary files this package writes next to their destination (see save_checkpoint).
_TEMP_NAME = re.compile(r"\..+\.\d+(\.[0-9a-f]+)?\.tmp")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed writers left in ``folder``; return them.

    Only names of the form ``.NAME.PID.tmp`` or ``.NAME.PID.HEX.tmp`` are removed.
    Call this only while holding the folder's :class:`~moglstm.lm.runlock.RunLock`:
    a live writer's temporary file matches too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if _TEMP_NAME.fullmatch(entry.name) and entry.is_file():
            _remove_quietly(entry)
            removed.append(entry)
    return removed


_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([\w.]+)")


def _reason(exc: BaseException) -> str:
    """Why torch.load refused, in our words (its message ends in advice to turn the
    protection off, which is never the right fix for a checkpoint)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    found = _GLOBAL.search(text)
    if found:
        return (
            f"it asks to import and call {short_repr(found.group(1), 80)[1:-1]} while loading, "
            "which a checkpoint never needs; refused before anything ran"
        )
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(exc).__name__}: {short_repr(first, 160)[1:-1]}" if first else type(exc).__name__


def _check_payload(payload: Any, path: Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(
            f"{str(path)!r} is a torch file but not a moglstm checkpoint (no format_version)"
        )
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{str(path)!r} has an invalid format_version {short_repr(version)}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} uses checkpoint format {version}; this moglstm reads formats up "
            f"to {FORMAT_VERSION}: upgrade moglstm"
        )
    return payload


__doc__ = f"{__doc__}\nThe keys of a training checkpoint::\n\n{describe_payload()}\n"
