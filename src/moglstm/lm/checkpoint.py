"""Checkpoints: plain-data snapshots that rebuild a run alone, written atomically.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python
data (dicts, lists, tuples, str, numbers, bools, None), so that
``torch.load(path, weights_only=True)`` reads it without running any pickled
code. The training loop builds the payload; its conventional keys are::

    format_version  int, added by save_checkpoint (FORMAT_VERSION)
    model           model.state_dict()
    optimizer       optimizer.state_dict()
    scheduler       lr-scheduler state_dict() or None
    config          moglstm.lm.config.to_dict(cfg)
    counters        {"step": int, "epoch": int, "best_valid_loss": float,
                     "bad_validations": int, ...}
    data            the training batch stream's state_dict() (position, epoch, generator)
    rng             capture_rng_state()
    vocab           Vocab.to_dict()

:func:`save_checkpoint` writes to a temporary file in the destination folder,
flushes and fsyncs it, reads it back to check every member's CRC-32, renames it
over the destination with :func:`os.replace` and fsyncs the folder, so a crash or
a full disk never leaves a partial file at the destination and never damages the
checkpoint already there. With ``keep_previous=True`` the checkpoint it replaces
(if it verifies) is kept as ``NAME.prev.pt`` (:func:`previous_path`), and
:func:`load_newest_checkpoint` falls back to that one when the newest is missing,
truncated or corrupt, so a run always has a good checkpoint to resume from.

:func:`load_checkpoint` checks the CRC-32 of every member before unpickling (a
flipped bit in tensor data would otherwise load silently) and unpickles with
``weights_only=True``, so a crafted file cannot run code.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import random
import re
import secrets
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.safety import ArchiveError, verify_archive

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_newest_checkpoint",
    "previous_path",
    "remove_stale_temp_files",
    "restore_rng_state",
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


class CheckpointError(ValueError):
    """A file that is not a readable moglstm checkpoint (truncated, corrupt or foreign)."""


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
        keep_previous: first move the checkpoint at ``path`` to
            :func:`previous_path` (replacing the one there), unless it fails its
            own check, in which case the older one there is kept instead.
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
        raise ValueError(
            f"payload['format_version']={version!r}, but this moglstm writes format "
            f"{FORMAT_VERSION}"
        )
    payload = {**payload, "format_version": FORMAT_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
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
    _fsync_folder(path.parent)
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
    """Move a good checkpoint at ``path`` to its ``.prev`` name before it is replaced."""
    if not path.is_file():
        return
    try:
        verify_archive(path)
    except ArchiveError as exc:  # never let a damaged file push out the good .prev one
        logger.warning("not keeping %s as the previous checkpoint: %s", path, exc)
        return
    os.replace(path, previous_path(path))


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable. Not possible on Windows, nor on every file system.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Checks the CRC-32 of every member first, then loads with ``weights_only=True``:
    no pickled code runs.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (as in :func:`torch.load`); ``"cpu"`` by default.

    Returns:
        The payload dict, including ``format_version``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt, holds more than plain
            data, is not a moglstm checkpoint or comes from a newer format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {str(path)!r} is a folder, not a file")
    try:
        verify_archive(path)
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except ArchiveError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from exc
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"cannot read checkpoint {str(path)!r}") from exc
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


def load_newest_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = "cpu"
) -> tuple[dict[str, Any], Path]:
    """Read ``path``, or the previous checkpoint kept beside it when ``path`` is bad.

    Tries ``path`` and then :func:`previous_path` (written by :func:`save_checkpoint`
    with ``keep_previous=True``); a missing, truncated or corrupt file is skipped
    with a warning that names it and says why.

    Args:
        path: the newest checkpoint, e.g. ``<run>/last.pt``.
        map_location: as in :func:`load_checkpoint`.

    Returns:
        ``(payload, the path it was read from)``.

    Raises:
        FileNotFoundError: neither file exists.
        CheckpointError: no candidate could be read; every failure is listed.
    """
    path = Path(path)
    candidates = [path, previous_path(path)]
    if not any(c.exists() for c in candidates):
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    failures = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            payload = load_checkpoint(candidate, map_location)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", candidate, exc)
            failures.append(str(exc))
            continue
        if failures:
            logger.warning("falling back to the previous checkpoint %s", candidate)
        return payload, candidate
    raise CheckpointError("no readable checkpoint: " + "; ".join(failures))


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


def _reason(exc: BaseException) -> str:
    """The useful part of torch.load's (often long, multi-line) error message."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def _check_payload(payload: Any, path: Path) -> dict[str, Any]:
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(
            f"{str(path)!r} is a torch file but not a moglstm checkpoint (no format_version)"
        )
    version = payload["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{str(path)!r} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} uses checkpoint format {version}; this moglstm reads formats up "
            f"to {FORMAT_VERSION}: upgrade moglstm"
        )
    return payload


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Return the state of every random number generator a run draws from, as plain data.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without
        CUDA), "mps": ByteTensor or None, "python": {"version", "state",
        "gauss_next"}, "numpy": {...} or None}``: tensors, lists and numbers only,
        so it can go into a checkpoint.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if _mps_available() else None,
        "python": _python_state(),
        "numpy": _numpy_state(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every generator back to a state returned by :func:`capture_rng_state`.

    CUDA states are restored for the devices present (a warning says when the
    device count differs, e.g. a GPU run resumed on CPU); MPS and NumPy states
    are restored when those are available.

    Args:
        state: the dict from :func:`capture_rng_state` (possibly via a checkpoint).

    Raises:
        ValueError: ``state`` is not shaped like :func:`capture_rng_state`'s result
            (the key is named).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
    for key in ("torch", "python"):
        if key not in state:
            raise ValueError(f"rng state: missing key {key!r} (have {sorted(state)})")
    torch.set_rng_state(_byte_tensor(state["torch"], "torch"))
    _restore_cuda(state.get("cuda") or [])
    if state.get("mps") is not None and _mps_available():
        torch.mps.set_rng_state(_byte_tensor(state["mps"], "mps"))
    _restore_python(state["python"])
    if state.get("numpy") is not None:
        _restore_numpy(state["numpy"])


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _byte_tensor(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise ValueError(f"rng state[{key!r}]: expected a uint8 tensor, got {value!r:.80}")
    return value.cpu()  # the setters want CPU byte tensors, whatever map_location did


def _restore_cuda(states: list) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if states and len(states) != available:
        warnings.warn(
            f"checkpoint holds CUDA RNG states for {len(states)} device(s) but {available} "
            "are available; restoring those present, so random draws may differ",
            stacklevel=3,
        )
    for device, s in enumerate(states[:available]):
        torch.cuda.set_rng_state(_byte_tensor(s, f"cuda[{device}]"), device)


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _restore_python(d: Any) -> None:
    try:
        random.setstate((d["version"], tuple(d["state"]), d["gauss_next"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"rng state['python'] is malformed: {exc!r}") from exc


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:  # numpy is optional; nothing to capture without it
        return None
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "key": [int(k) for k in key],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _restore_numpy(d: Any) -> None:
    try:
        import numpy as np
    except ImportError:
        warnings.warn("checkpoint holds a NumPy RNG state but NumPy is not installed", stacklevel=3)
        return
    try:
        key = np.asarray(d["key"], dtype=np.uint32)
        np.random.set_state((d["kind"], key, d["pos"], d["has_gauss"], d["cached_gaussian"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"rng state['numpy'] is malformed: {exc!r}") from exc
