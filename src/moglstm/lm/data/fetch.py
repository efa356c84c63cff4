"""Finding and downloading the named corpora, every file checked against its SHA-256.

The downloadable corpora of :data:`~moglstm.lm.data.sources.SOURCES` are looked up in

1. ``DataConfig.data_dir`` (given explicitly: it must hold the corpus),
2. the folder named by ``$MOGLSTM_DATA`` (used when it holds the corpus),
3. the download cache (``DataConfig.cache_dir``, else ``$MOGLSTM_CACHE``, else
   ``~/.cache/moglstm``), downloading from the corpus's public source on first use
   (or from ``$MOGLSTM_MIRROR``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from moglstm.lm.data.sources import CorpusSource, source
from moglstm.lm.errors import UserError
from moglstm.lm.safety import short_repr

__all__ = [
    "ChecksumError",
    "CorpusFetchError",
    "DownloadError",
    "default_cache_dir",
    "download",
    "fetch_corpus",
    "sha256_file",
]

logger = logging.getLogger("moglstm.lm.data")

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class CorpusFetchError(UserError, RuntimeError):
    """A corpus file could not be obtained or did not verify."""


class DownloadError(CorpusFetchError):
    """A download failed (network error, HTTP error or truncated transfer)."""


class ChecksumError(CorpusFetchError):
    """A file's SHA-256 differs from the published one."""


def _local_copy_hint(src: CorpusSource) -> str:
    layout = src.layout()
    return (
        f"To use a local copy instead, set data.data_dir (e.g. data.data_dir=~/corpora) or the "
        f"MOGLSTM_DATA environment variable to a folder holding {layout}. Or train on the "
        "corpus bundled with the package, with no download: data.corpus=shakespeare (the "
        "quickstart preset, what `moglstm train` runs without --preset)."
    )


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, sha256: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != sha256:
        raise ChecksumError(f"SHA-256 mismatch for {what}: expected {sha256}, got {actual}")


def _install(dest: Path, sha256: str, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write ``dest`` through a temp file in its folder, renamed into place once verified.

    Whatever goes wrong, the temp file is removed and ``dest`` is left untouched.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "xb") as f:
            write(f)
        _verify(tmp, sha256, what)
        os.replace(tmp, dest)
    except ChecksumError as err:
        raise ChecksumError(f"{err}; nothing was written to {dest}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _copy_response(url: str, timeout: float) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        request = urllib.request.Request(url, headers={"User-Agent": "moglstm"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            received = 0
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                f.write(chunk)
                received += len(chunk)
        # urllib does not raise on a connection closed before Content-Length bytes came
        if expected is not None and received != expected:
            raise DownloadError(
                f"truncated transfer from {url}: got {received} of {expected} bytes"
            )

    return write


def download(url: str, dest: str | os.PathLike[str], sha256: str, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and check its SHA-256; reuse ``dest`` if it verifies.

    The transfer goes to a temporary file in ``dest``'s folder that is renamed to
    ``dest`` only after the checksum matched, so an interrupted or corrupt download
    never leaves a file that a later run would trust.

    Args:
        url: the address to fetch (``http``, ``https`` or ``file``).
        dest: the final path of the file.
        sha256: the expected hex SHA-256 digest.
        timeout: seconds to wait on the connection before giving up.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        DownloadError: the server could not be reached, answered with an error, or
            closed the connection early.
        ChecksumError: the downloaded bytes do not match ``sha256``.
    """
    if not isinstance(url, str) or not url:
        raise UserError(f"url must be a non-empty string, got {short_repr(url)}")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise UserError(f"sha256 must be a 64-character hex digest, got {short_repr(sha256)}")
    dest = Path(dest)
    sha256 = sha256.lower()
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    logger.info("downloading %s to %s", url, dest)
    try:
        _install(dest, sha256, _copy_response(url, timeout), what=f"download of {url}")
    except (urllib.error.URLError, HTTPException, OSError) as err:
        raise DownloadError(f"download of {url} failed: {err}") from err
    return dest


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the download cache folder.

    ``cache_dir`` if given, else ``$MOGLSTM_CACHE``, else ``~/.cache/moglstm``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MOGLSTM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moglstm"


def _source(name: str) -> CorpusSource:
    src = source(name)
    if src.bundled:
        raise UserError(f"corpus {name!r} is bundled with the package, not downloaded")
    return src


def _present(src: CorpusSource, folder: Path) -> list[str]:
    """Names of the corpus files found in ``folder`` (one file holding every split: the
    first of those present, the one to use)."""
    found = [f for f in src.local if (folder / f).is_file()]
    return found[:1] if src.split_sizes is not None else found


def _check_local(src: CorpusSource, folder: Path) -> Path:
    """Verify a user-provided corpus folder; raise UserError naming a missing file."""
    found = _present(src, folder)
    if src.split_sizes is not None and not found:
        paths = " nor ".join(str(folder / f) for f in src.local)
        raise UserError(f"missing {src.name} file: neither {paths} exists")
    missing = [f for f in src.local if f not in found]
    if src.split_sizes is None and missing:
        raise UserError(f"missing {src.name} file: {folder / missing[0]} does not exist")
    for f in found:
        try:
            _verify(folder / f, src.sha256(f), str(folder / f))
        except ChecksumError as err:
            raise ChecksumError(
                f"{err}. This is not the published {src.name} file; "
                "replace it or point data_dir elsewhere."
            ) from None
    return folder


def _cached_ok(src: CorpusSource, folder: Path, local: str) -> bool:
    """True if the cached ``local`` file verifies; a cached file that does not is deleted."""
    path = folder / local
    if not path.is_file():
        return False
    if sha256_file(path) == src.sha256(local):
        return True
    logger.warning("cached %s does not verify; deleting it", path)
    path.unlink()
    return False


def _fetch_into(src: CorpusSource, folder: Path, mirror: str | None) -> None:
    """Download whatever of the corpus is missing from the cache ``folder``."""
    base = mirror or os.environ.get("MOGLSTM_MIRROR") or src.base_url
    base = base if base.endswith("/") else base + "/"
    try:
        for remote, local in src.files:
            if not _cached_ok(src, folder, local):
                download(base + remote, folder / local, src.sha256(local))
        if src.archive is not None and not all(_cached_ok(src, folder, m[1]) for m in src.members):
            zip_path = folder / src.archive
            download(base + src.archive, zip_path, src.sha256(src.archive))
            _unpack(src, zip_path, src.members)
            zip_path.unlink()
    except CorpusFetchError as err:
        raise type(err)(f"{err}\n{_local_copy_hint(src)}") from err


def _unpack(src: CorpusSource, zip_path: Path, members: Sequence[tuple[str, str]]) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        for member, local in members:

            def write(f: BinaryIO, member: str = member) -> None:
                with archive.open(member) as opened:
                    for chunk in iter(lambda: opened.read(_CHUNK), b""):
                        f.write(chunk)

            dest = zip_path.parent / local
            _install(dest, src.sha256(local), write, f"{zip_path}:{member}")


def fetch_corpus(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mirror: str | None = None,
) -> Path:
    """Find or download a named corpus and return the verified folder holding it.

    Args:
        name: ``ptb``, ``ptb-char``, ``wikitext-2`` or ``enwik8``.
        data_dir: a folder laid out like ``shared/data`` that must hold the corpus.
            When ``None``, ``$MOGLSTM_DATA`` is used if it holds the corpus.
        cache_dir: where downloads go (see :func:`default_cache_dir`).
        mirror: base URL replacing the public sources (else ``$MOGLSTM_MIRROR``); files
            are fetched as ``<mirror>/<file>`` with the published names
            (``ptb.train.txt``, ``ptb.char.train.txt``, ``wikitext-2-v1.zip``,
            ``enwik8.zip``).

    Returns:
        The folder with ``train.txt valid.txt test.txt``, or ``enwik8``/``enwik8.zip``.

    Raises:
        ValueError: unknown name, or ``data_dir`` lacks one of the corpus's files.
        ChecksumError: a local file differs from the published one.
        DownloadError: a needed download failed.
    """
    src = _source(name)
    if data_dir is not None:
        return _check_local(src, Path(data_dir).expanduser() / name)
    env = os.environ.get("MOGLSTM_DATA")
    if env and (Path(env).expanduser() / name).is_dir():
        return _check_local(src, Path(env).expanduser() / name)
    folder = default_cache_dir(cache_dir) / name
    _fetch_into(src, folder, mirror)
    return folder


