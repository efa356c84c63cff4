"""Defences against damaged and hostile input: checkpoints, text and non-finite losses.

Three kinds of input reach a run from outside, and each has one rule here:

* **Checkpoint files** are zip archives written by :func:`torch.save`. Before a file is
  unpickled, :func:`verify_archive` reads every member back and checks its CRC-32, so a
  truncated file or a flipped bit (which ``torch.load`` itself would accept silently
  inside tensor data) is reported by name. Unpickling then uses
  ``torch.load(weights_only=True)`` (see :mod:`moglstm.lm.checkpoint`), which refuses to
  run any code a crafted pickle carries.
* **Text** (corpus files) must be UTF-8 at word and character level; anything else is
  a :class:`ValueError` naming the file, the byte offset, the line and the bytes
  (:func:`decode_utf8`). Byte level (``data.level=byte``) takes any bytes. Prompts are
  Python strings: at byte level they become their UTF-8 bytes, and strings that came
  from undecodable command-line bytes (Python's ``surrogateescape``) give back exactly
  those bytes (:func:`utf8_bytes`); at word and character level such characters are
  simply unknown and read as ``<unk>``.
* **Non-finite losses** are handled by the policy ``train.nonfinite``
  (:data:`NONFINITE_POLICIES`): ``stop`` the run, ``skip`` the step (no update), or
  ``rollback`` to the last checkpoint with the learning rate multiplied by
  ``train.rollback_lr_factor``.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

from moglstm.lm.config import NONFINITE_POLICIES

__all__ = [
    "NONFINITE_POLICIES",
    "ArchiveError",
    "decode_utf8",
    "utf8_bytes",
    "verify_archive",
]

_CONTEXT_BYTES = 8  # bytes shown either side of an undecodable byte


class ArchiveError(ValueError):
    """A checkpoint archive is truncated, corrupt or not a zip archive at all."""


# --------------------------------------------------------------------------- archives


def verify_archive(path: str | os.PathLike) -> None:
    """Check that ``path`` is a complete zip archive whose members match their CRC-32.

    ``torch.save`` writes such an archive (uncompressed members, each with a CRC-32).
    Every member is read back in full, so this costs one read of the file.

    Args:
        path: the file to check.

    Raises:
        ArchiveError: the file is not a zip archive, is cut short, or a member's bytes
            do not match its checksum (the member is named).
        OSError: the file cannot be read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member, checking its CRC-32
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{str(path)!r} is not a complete zip archive ({exc})") from exc
    except (EOFError, ValueError, struct.error, zlib.error, NotImplementedError) as exc:
        # a damaged header or a member that claims an odd compression
        raise ArchiveError(
            f"{str(path)!r} is a damaged zip archive ({type(exc).__name__}: {exc})"
        ) from exc
    if bad is not None:
        raise ArchiveError(f"{str(path)!r} is corrupt: member {bad!r} fails its CRC-32 check")


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
        raise ValueError(
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
