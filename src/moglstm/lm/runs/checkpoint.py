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
file cannot run code. :func:`check_training_checkpoint` then checks the parts
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.errors import UserError

from moglstm.lm.runs.payload import MODEL_ENTRIES, TRAINING_ENTRIES, describe_payload
from moglstm.lm.safety import (
    ArchiveError,
    UnsafePathError,
    check_tree_size,
    fsync_folder,
    open_regular,
    short_repr,
    temp_name,
    verify_archive,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "check_training_checkpoint",
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


class CheckpointError(UserError):
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
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            verify_archive(path, f)
    except (ArchiveError, UnsafePathError) as exc:  # never push out the good .prev one
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
        CheckpointError: the file is truncated, corrupt, holds more than plain
            data, is not a moglstm checkpoint, comes from a newer format, or is a
            symbolic link or not a regular file.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"checkpoint path {str(path)!r} is a folder, not a file")
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            verify_archive(path, f)
            f.seek(0)
            payload = torch.load(f, map_location=map_location, weights_only=True)
    except UnsafePathError as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc}") from None
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
            :func:`check_training_checkpoint`).

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


# --------------------------------------------------------------------------- consistency

#: Entries a checkpoint needs to rebuild a model, and to resume its training.
_MAX_PLAIN_VALUES = 1_000_000  # plain values outside the vocabulary (a payload has ~1000)
_SHOWN = 3  # names listed in an error, at most


def check_training_checkpoint(
    payload: Mapping[str, Any], path: Path, *, resume: bool = False
) -> Any:
    """Check a loaded checkpoint against its own config before anything is built from it.

    The checks, in order, each cheap and none allocating the model:

    * the entries a model needs (and with ``resume`` those training needs) are there,
      and no entry is plain data of more than a million values (shared references
      counted each time), so a small crafted file cannot expand into a huge config;
    * the config is valid (:func:`~moglstm.lm.config.validate`), the vocabulary is a
      list of distinct strings;
    * the model the config describes is built on the ``meta`` device (no memory)
      and every weight (``model`` and ``train_model``) has its name and shape, with
      finite values;
    * with ``resume``: the counters are numbers, and the optimizer's groups and
      moments match the model's parameters.

    Args:
        payload: from :func:`load_checkpoint`.
        path: the file it came from (named in errors).
        resume: also check what resuming training needs.

    Returns:
        The validated :class:`~moglstm.lm.config.RunConfig`.

    Raises:
        CheckpointError: one line naming the file and the first inconsistency.
    """
    where = f"checkpoint {str(path)!r}"
    needed = TRAINING_ENTRIES if resume else MODEL_ENTRIES
    missing = [k for k in needed if k not in payload]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: not a training checkpoint")
    try:
        for key, value in payload.items():
            if key not in ("vocab", "config"):
                check_tree_size(value, f"its {short_repr(key)}", max_values=_MAX_PLAIN_VALUES)
        check_tree_size(payload["config"], "its config")
        cfg = _checked_config(payload["config"])
        vocab_size = _checked_vocab(payload["vocab"])
        model = _meta_model(cfg, vocab_size)
        for key in ("model", "train_model"):
            if key in payload:
                _check_weights(payload[key], model, key, cfg)
        if resume:
            _check_counters(payload["counters"])
            _check_optimizer(payload["optimizer"], model, cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg


def _checked_config(config: Any) -> Any:
    from moglstm.lm.config import from_dict, validate

    try:
        return validate(from_dict(config))
    except (TypeError, ValueError) as exc:
        lines = str(exc).splitlines()
        shown = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[1].strip()}"
        raise UserError(f"its config is not valid ({shown})") from None


def _checked_vocab(vocab: Any) -> int:
    from moglstm.lm.data import Vocab

    if not isinstance(vocab, Mapping) or not isinstance(vocab.get("tokens"), (list, tuple)):
        raise UserError("its vocab is not a mapping with a list of tokens")
    check_tree_size(
        {k: v for k, v in vocab.items() if k != "tokens"}, "its vocab", max_values=100
    )
    if not all(isinstance(t, str) for t in vocab["tokens"]):
        raise UserError("its vocab holds tokens that are not strings")
    try:
        return len(Vocab.from_dict(vocab))
    except (TypeError, ValueError) as exc:
        raise UserError(f"its vocab is malformed ({short_repr(str(exc), 160)[1:-1]})") from None


def _meta_model(cfg: Any, vocab_size: int) -> torch.nn.Module:
    from moglstm.lm.models import build_on_meta

    try:
        return build_on_meta(cfg.model, vocab_size)
    except (RuntimeError, ValueError, OverflowError) as exc:
        raise UserError(
            f"its config describes a model that cannot be built ({short_repr(str(exc), 160)})"
        ) from None


def _check_weights(state: Any, model: torch.nn.Module, key: str, cfg: Any) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"its {key!r} entry is not a mapping of weights")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = [f"lacks {_names(missing)}"] if missing else []
        parts += [f"has extra {_names(extra)}"] if extra else []
        raise UserError(
            f"its {key!r} weights do not fit its config ({_model_summary(cfg)}): "
            + " and ".join(parts)
        )
    for name, want in expected.items():
        have = state[name]
        if not isinstance(have, torch.Tensor):
            raise TypeError(f"its weight {key}[{name!r}] is a {type(have).__name__}, not a tensor")
        if have.shape != want.shape:
            raise UserError(
                f"its weight {key}[{name!r}] has shape {tuple(have.shape)} but its config "
                f"({_model_summary(cfg)}) gives {tuple(want.shape)}"
            )
        _check_finite(have, f"its weight {key}[{name!r}]")


def _check_finite(t: torch.Tensor, label: str) -> None:
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise UserError(f"{label} holds NaN or infinite values")


def _check_counters(counters: Any) -> None:
    if not isinstance(counters, Mapping):
        raise TypeError("its counters are not a mapping")
    step = counters.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"its counters have step={short_repr(step)}: expected an int >= 0")
    for name, value in counters.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"its counter {short_repr(name)} is {short_repr(value)}, not a number")


def _check_optimizer(state: Any, model: torch.nn.Module, cfg: Any) -> None:
    from moglstm.lm.policies import make_optimizer

    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        raise TypeError("its optimizer entry is not an optimizer state")
    fresh = make_optimizer(model, cfg.train)  # on the meta parameters: allocates nothing
    params = [p for group in fresh.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in fresh.param_groups]
    saved = state["param_groups"]
    if [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in saved] != sizes:
        raise UserError(
            f"its optimizer state has groups of {short_repr([_count(g) for g in saved])} "
            f"parameters but its config's model has {sizes}"
        )
    moments = state.get("state", {})
    if not isinstance(moments, Mapping):
        raise TypeError("its optimizer's state is not a mapping")
    for index, entry in moments.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise UserError(
                f"its optimizer state names parameter {short_repr(index)}, not one of its model's"
            )
        for name, value in (entry.items() if isinstance(entry, Mapping) else ()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != params[index].shape:
                    raise UserError(
                        f"its optimizer's {short_repr(name)} of parameter {index} has shape "
                        f"{tuple(value.shape)}, but the parameter has {tuple(params[index].shape)}"
                    )
                _check_finite(value, f"its optimizer's {short_repr(name)} of parameter {index}")


def _count(group: Any) -> Any:
    return len(group["params"]) if isinstance(group, Mapping) and "params" in group else "?"


def _names(names: list) -> str:
    shown = ", ".join(short_repr(n, 60) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _model_summary(cfg: Any) -> str:
    m = cfg.model
    if m.kind == "transformer":
        t = m.transformer
        return (
            f"model.kind='transformer', model.transformer.d_model={t.d_model}, "
            f"model.transformer.depth={t.depth}"
        )
    return (
        f"model.kind={m.kind!r}, model.hidden_size={m.hidden_size}, "
        f"model.num_layers={m.num_layers}"
    )


__doc__ = f"{__doc__}\nThe keys of a training checkpoint::\n\n{describe_payload()}\n"
