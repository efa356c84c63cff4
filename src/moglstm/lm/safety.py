"""Defences against damaged and hostile input: checkpoints, configs, run folders, text.

Several kinds of input reach a run from outside, and each has one rule here:

* **Checkpoint files** are zip archives written by :func:`torch.save`. Before a file is
  unpickled, :func:`verify_archive` reads every member back and checks its CRC-32, so a
  truncated file or a flipped bit (which ``torch.load`` itself would accept silently
  inside tensor data) is reported by name. Unpickling then uses
  ``torch.load(weights_only=True)`` (see :mod:`moglstm.lm.runs.checkpoint`), which refuses to
  run any code a crafted pickle carries.
* **Text** (corpus files) must be UTF-8 at word and character level; anything else is
  a :class:`ValueError` naming the file, the byte offset, the line and the bytes
  (:func:`decode_utf8`). Byte level (``data.level=byte``) takes any bytes. Prompts are
  Python strings: at byte level they become their UTF-8 bytes, and strings that came
  from undecodable command-line bytes (Python's ``surrogateescape``) give back exactly
  those bytes (:func:`utf8_bytes`); at word and character level such characters are
  simply unknown and read as ``<unk>``.
* **Values quoted in errors** go through :func:`short_repr`: a bounded repr that
  never walks more than a few dozen elements of a container nor shows more than
  :data:`REPR_LIMIT` characters, so no message grows with its input.
* **YAML** (presets, config files, command-line overrides) is read by
  :func:`load_yaml`: ``yaml.safe_load`` rules (no Python objects) and, in addition,
  no aliases (``*name``, which let a few hundred bytes expand into billions of
  elements), at most :data:`MAX_YAML_BYTES`, and errors that give the line and
  column but never echo the file's text. Plain data from a checkpoint (its config)
  is checked by :func:`check_tree_size`, which counts shared references as often as
  they are reached.
* **Run folders** may come from elsewhere (a shared tarball), so nothing in one is
  followed out of it: files there are opened with ``O_NOFOLLOW`` and must be
  regular files (:func:`open_regular`), and whole files are written to a fresh
  temporary file renamed into place (:func:`write_atomic`), which replaces a planted
  link instead of writing through it.
* **Non-finite losses** are handled by the policy ``train.nonfinite``
  (:data:`moglstm.lm.policies.NONFINITE_POLICIES`).
"""

from __future__ import annotations

import errno
import os
import reprlib
import secrets
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from moglstm.lm.errors import UserError

__all__ = [
    "MAX_RUN_TEXT_BYTES",
    "MAX_YAML_BYTES",
    "REPR_LIMIT",
    "ArchiveError",
    "UnsafePathError",
    "check_regular_or_absent",
    "check_tree_size",
    "decode_utf8",
    "describe_path",
    "fsync_folder",
    "load_yaml",
    "load_yaml_file",
    "open_regular",
    "open_run_file",
    "read_regular",
    "short_repr",
    "temp_name",
    "utf8_bytes",
    "verify_archive",
    "write_atomic",
]

_CONTEXT_BYTES = 8  # bytes shown either side of an undecodable byte
#: The most characters :func:`short_repr` returns.
REPR_LIMIT = 120
#: The largest YAML text read as a config (presets are a few hundred bytes).
MAX_YAML_BYTES = 1 << 20
#: The most values (containers and leaves, shared ones counted each time) and the
#: deepest nesting :func:`check_tree_size` accepts by default: a config has ~100.
MAX_TREE_VALUES = 100_000
MAX_TREE_DEPTH = 32
#: What to do on a NaN/inf training loss (``train.nonfinite``).


class ArchiveError(UserError):
    """A checkpoint archive is truncated, corrupt or not a zip archive at all."""


class UnsafePathError(UserError):
    """A file in a run folder is a symbolic link or not a regular file: not followed."""


# --------------------------------------------------------------------------- bounded values


class _ShortRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 5

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # repr() of a huge int is slow, and refused past 4300 digits
            return f"<an int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)``, bounded: at most ``limit`` characters, whatever ``value`` is.

    Containers show their first few elements and nesting levels (``[[[...], ...], ...]``)
    and are never walked in full, so a value built from shared references with
    billions of elements costs microseconds. Every error message that quotes a value
    from outside (a config, an override, a checkpoint) uses this.
    """
    text = repr(value[:limit]) if isinstance(value, str) else _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_tree_size(
    value: Any, label: str, *, max_values: int = MAX_TREE_VALUES, max_depth: int = MAX_TREE_DEPTH
) -> None:
    """Raise ``ValueError`` if plain data ``value`` is too large or too deep to be a config.

    Every container and leaf counts, a shared one as often as it is reached, so
    data built from shared references (a pickled checkpoint's, YAML aliases') is
    measured by the size it would unfold to; the walk stops as soon as a limit is
    passed, so checking costs at most ``max_values`` steps.

    Args:
        value: dicts, lists and tuples of leaves.
        label: what to call ``value`` in the error, e.g. ``"the config of 'last.pt'"``.
    """
    stack, seen = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if depth > max_depth:
            raise UserError(f"{label} nests deeper than {max_depth} levels: not a config")
        if seen > max_values:
            raise UserError(
                f"{label} holds more than {max_values:,} values (shared ones counted each time "
                "they occur): too large to be a config"
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for kv in item.items() for v in kv)
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


# --------------------------------------------------------------------------- YAML


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without aliases: a config never needs to repeat a node."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML aliases (*name) are not accepted in a config: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, label: str) -> Any:
    """Parse ``text`` as YAML with :func:`yaml.safe_load`'s rules, minus aliases.

    Args:
        text: the YAML text (a file's or a command-line value's).
        label: what to call it in errors, e.g. ``"preset file 'x.yaml'"``.

    Raises:
        ValueError: the text is longer than :data:`MAX_YAML_BYTES`, is not valid YAML,
            uses an alias or a Python tag, or nests absurdly deep. The message gives
            the line and column and the parser's reason, never the text itself.
    """
    if len(text) > MAX_YAML_BYTES:
        raise UserError(
            f"{label} is too long for a config ({len(text):,} characters; at most "
            f"{MAX_YAML_BYTES:,})"
        )
    loader = None
    try:
        loader = _ConfigLoader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise UserError(f"{label} is not valid YAML: {_yaml_reason(exc)}") from None
    except RecursionError:
        raise UserError(f"{label} is not valid YAML: it nests too deep") from None
    except ValueError as exc:  # int() of a number with more than 4300 digits
        raise UserError(f"{label} is not valid YAML: {short_repr(str(exc), 80)[1:-1]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(
    path: str | os.PathLike,
    label: str,
    *,
    in_run_folder: bool = False,
    error: type[UserError] = UserError,
) -> Any:
    """:func:`load_yaml` of a file, reading at most :data:`MAX_YAML_BYTES` + 1 bytes of it.

    Args:
        in_run_folder: open with :func:`open_regular` (no link followed, no FIFO waited on).
        error: the error raised for a file too long or not UTF-8 (a config's: ``ConfigError``).

    Raises:
        ValueError: as :func:`load_yaml`, or the file is not UTF-8 (the offset only);
            :class:`UnsafePathError` for a link or non-regular file in a run folder.
        OSError: the file cannot be read.
    """
    fd = open_regular(path, os.O_RDONLY) if in_run_folder else os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise error(f"{label} is too long for a config (more than {MAX_YAML_BYTES:,} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{label} is not UTF-8 text (byte offset {exc.start})") from None
    return load_yaml(text, label)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """The parser's reason and position, without the snippet of text PyYAML quotes."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    reason = " ".join(part for part in (exc.context, exc.problem) if part)
    return where + (reason[:160] + "..." if len(reason) > 160 else reason)


# --------------------------------------------------------------------------- paths


def describe_path(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` is (or links to) a regular file, else what it is instead.

    Returns phrases like ``"does not exist"``, ``"is a folder"`` or ``"is a FIFO
    (named pipe)"``, to complete a sentence naming the path. Never opens it (opening
    a FIFO would wait for a writer).
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return _kind_of(mode)


def _kind_of(mode: int) -> str | None:
    kinds = (
        (stat.S_ISREG, None),
        (stat.S_ISDIR, "is a folder, not a file"),
        (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
        (stat.S_ISSOCK, "is a socket, not a regular file"),
        (stat.S_ISCHR, "is a character device, not a regular file"),
        (stat.S_ISBLK, "is a block device, not a regular file"),
    )
    return next((what for test, what in kinds if test(mode)), "is not a regular file")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """``os.open`` a file in a run folder without following a link; returns the descriptor.

    ``O_NOFOLLOW`` refuses a symbolic link in the last component; ``O_NONBLOCK`` keeps
    a planted FIFO from blocking the open, and anything but a regular file is then
    refused.

    Raises:
        UnsafePathError: ``path`` is a symbolic link or not a regular file.
        OSError: any other failure to open it (e.g. ``FileNotFoundError``).
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and os.path.islink(path)):
            raise UnsafePathError(
                f"{str(path)!r} is a symbolic link: moglstm never follows links inside a "
                "run folder (remove the link, or copy the file it points to in its place)"
            ) from None
        raise
    try:
        kind = _kind_of(os.fstat(fd).st_mode)
        if kind is not None:
            raise UnsafePathError(f"{str(path)!r} {kind}: remove it from the run folder")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular_or_absent(path: str | os.PathLike) -> Path:
    """``path``, if it is absent or a regular file that is not a link, for a library that
    opens it by name (SQLite): call it right before that open.

    Raises:
        UnsafePathError: ``path`` is a symbolic link (even a dangling one) or not a regular file.
    """
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(
            f"{str(path)!r} is a symbolic link: moglstm never follows links inside a "
            "run folder (remove the link, or copy the file it points to in its place)"
        )
    kind = describe_path(path)
    if kind not in (None, "does not exist"):
        raise UnsafePathError(f"{str(path)!r} {kind}: remove it from the run folder")
    return path


#: The largest text file of a run folder read whole (metrics.jsonl, evaluations.jsonl).
MAX_RUN_TEXT_BYTES = 1 << 28


def open_run_file(path: str | os.PathLike, limit: int | None = None) -> BinaryIO:
    """A run folder's file opened for reading: the one opener every command uses.

    No symbolic link is followed, nothing but a regular file is opened (a FIFO, socket
    or device is refused at once, never waited on), and with ``limit`` a file larger
    than that many bytes is refused before anything is read.

    Raises:
        UnsafePathError: a link, not a regular file, or larger than ``limit``.
        OSError: any other failure to open it (e.g. ``FileNotFoundError``).
    """
    fd = open_regular(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise UnsafePathError(
                f"{str(path)!r} is {size:,} bytes, more than the {limit:,} such a file may be: "
                "not read"
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The bytes of a regular file in a run folder (:func:`open_run_file`; at most
    ``limit`` bytes, else :class:`UnsafePathError`)."""
    with open_run_file(path, limit) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:  # it grew since it was measured
        raise UnsafePathError(f"{str(path)!r} is more than the {limit:,} bytes it may be")
    return data


def temp_name(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path``: ``.NAME.PID.HEX.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place.

    The temporary file is created exclusively (never an existing file or link),
    fsynced, and renamed over ``path`` with :func:`os.replace`, which replaces a
    link at ``path`` rather than writing through it. Readers see the old or the new
    file, never a part.
    """
    path = Path(path)
    tmp = temp_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        with os.fdopen(os.open(tmp, flags | _NOFOLLOW, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be fsynced)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- archives


def verify_archive(path: str | os.PathLike, file: Any = None) -> None:
    """Check that ``path`` is a complete zip archive whose members match their CRC-32.

    ``torch.save`` writes such an archive (uncompressed members, each with a CRC-32).
    Every member is read back in full, so this costs one read of the file.

    Args:
        path: the file to check (named in errors).
        file: an open binary file of ``path`` to read instead of opening ``path``
            (so that the caller goes on to read the very file checked).

    Raises:
        ArchiveError: the file is not a zip archive, is cut short, or a member's bytes
            do not match its checksum (the member is named).
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path if file is None else file) as archive:
            bad = archive.testzip()  # reads every member, checking its CRC-32
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{str(path)!r} is not a complete zip archive ({exc})") from exc
    except (EOFError, ValueError, struct.error, zlib.error, NotImplementedError) as exc:
        # a damaged header or a member that claims an odd compression
        raise ArchiveError(
            f"{str(path)!r} is a damaged zip archive ({type(exc).__name__}: {exc})"
        ) from exc
    if bad is not None:
        raise ArchiveError(
            f"{str(path)!r} is corrupt: member {short_repr(bad)} fails its CRC-32 check"
        )


# --------------------------------------------------------------------------- text


def decode_utf8(raw: bytes, label: str) -> str:
    """Decode ``raw`` as strict UTF-8, or raise a ``ValueError`` that says where it fails.

    Args:
        raw: the bytes of a text file.
        label: what to call them in the error, e.g. the file name.

    Raises:
        ValueError: ``raw`` is not valid UTF-8; the message gives the byte offset, the
            line number, the offending bytes and what to do.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"raw: expected bytes, got {type(raw).__name__}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        start, end = exc.start, exc.end
        line = bytes(raw[:start]).count(b"\n") + 1
        context = bytes(raw[max(0, start - _CONTEXT_BYTES) : end + _CONTEXT_BYTES])
        raise UserError(
            f"{label} is not valid UTF-8: byte offset {start} (line {line}) has "
            f"{bytes(raw[start:end])!r} ({exc.reason}) in {context!r}. Word- and "
            "character-level corpora must be UTF-8: convert the file (e.g. iconv -f "
            "latin1 -t utf-8) or read it as raw bytes with data.level=byte"
        ) from None


def utf8_bytes(text: str) -> bytes:
    """The UTF-8 bytes of ``text``, keeping bytes that Python could not decode.

    Command-line arguments that are not valid UTF-8 reach Python as lone surrogates
    ``U+DC80..U+DCFF`` (``surrogateescape``); they become the original bytes again.
    Any other lone surrogate (only possible from Python code) becomes U+FFFD.

    Args:
        text: any Python string.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        cleaned = "".join("\ufffd" if _foreign_surrogate(c) else c for c in text)
        return cleaned.encode("utf-8", "surrogateescape")


def _foreign_surrogate(c: str) -> bool:
    """A surrogate code point that ``surrogateescape`` cannot turn back into a byte."""
    code = ord(c)
    return 0xD800 <= code <= 0xDFFF and not 0xDC80 <= code <= 0xDCFF
