"""Reading a corpus into token ids: the user's text files, a named corpus, the bundled one.

How a named corpus reads (its level, its files, a space token, one byte file cut into
splits) comes from its :class:`~moglstm.lm.data.sources.CorpusSource`.
"""

from __future__ import annotations

import hashlib
import lzma
import zipfile
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moglstm.lm.data.fetch import ChecksumError, fetch_corpus
from moglstm.lm.data.sources import BUNDLED, EOS, LEVELS, SOURCES, SPLITS, CorpusSource, source
from moglstm.lm.data.vocab import Vocab
from moglstm.lm.errors import UserError
from moglstm.lm.safety import decode_utf8, describe_path, short_repr

__all__ = ["Corpus", "bundled_text", "load_corpus"]


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
            raise UserError(f"split must be one of {SPLITS}, got {short_repr(name)}")
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
        raise UserError(f"corpus file {path} is empty")
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
        raise UserError(f"missing corpus file: {path} does not exist")
    if problem is not None:
        raise UserError(f"corpus file {path} {problem}: give a text file")


def _read_bytes(path: Path) -> bytes:
    _check_corpus_file(path)
    raw = path.read_bytes()
    if not raw:
        raise UserError(f"corpus file {path} is empty")
    return raw


def _byte_ids(raw: bytes) -> Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def _encoded(vocab: Vocab, tokens: list[str]) -> Tensor:
    # array -> tensor is ~5x faster than torch.tensor(list) for millions of ids
    return torch.frombuffer(array("q", vocab.encode(tokens)), dtype=torch.int64).clone()


def _text_paths(cfg: Any) -> dict[str, Path]:
    explicit = {"train": cfg.train_path, "valid": cfg.valid_path, "test": cfg.test_path}
    paths = {}
    for s in SPLITS:
        if explicit[s] is not None:
            paths[s] = Path(explicit[s]).expanduser()
        elif cfg.path is not None:
            paths[s] = Path(cfg.path).expanduser() / f"{s}.txt"
        else:
            raise UserError(
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
        raise UserError(f"no bundled corpus {name!r}; bundled: {', '.join(BUNDLED)}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    resource = resources.files("moglstm.lm") / "corpora" / name / f"{split}.txt.xz"
    raw = lzma.decompress(resource.read_bytes())
    if hashlib.sha256(raw).hexdigest() != SOURCES[name].sha256(f"{split}.txt"):
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


def _load_split_file(src: CorpusSource, folder: Path) -> Corpus:
    """A corpus whose one byte file (or zip) holds every split, cut by ``src.split_sizes``."""
    plain, archived = src.local[0], src.local[-1]
    if (folder / plain).is_file():
        raw = (folder / plain).read_bytes()
        # also reached from the cache, where only the zip was verified
        if hashlib.sha256(raw).hexdigest() != src.sha256(plain):
            raise ChecksumError(f"SHA-256 mismatch for {folder / plain}")
    else:
        with zipfile.ZipFile(folder / archived) as archive:
            raw = archive.read(src.member or plain)
    n_train, n_valid, n_test = src.split_sizes or (0, 0, 0)
    if len(raw) != n_train + n_valid + n_test:
        raise UserError(
            f"{src.name} has {len(raw):,} bytes, expected {n_train + n_valid + n_test:,}"
        )
    # convert split by split: the whole file as int64 would be 800 MB at once
    train = _byte_ids(raw[:n_train])
    valid = _byte_ids(raw[n_train : n_train + n_valid])
    test = _byte_ids(raw[n_train + n_valid :])
    return Corpus(src.name, "byte", Vocab.byte_level(), train, valid, test)


def load_corpus(
    cfg: Any, *, vocab: Vocab | None = None, mirror: str | None = None
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
        UserError: unknown corpus or level, a missing or empty file.
        CorpusFetchError: a download failed or a file did not verify.
    """
    from moglstm.lm.config import DataConfig  # the config imports this package's registry

    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    name = cfg.corpus
    src = None if name == "text" else source(name)
    if src is None and cfg.level not in LEVELS:
        raise UserError(f"data.level must be one of {LEVELS}, got {short_repr(cfg.level)}")
    level = cfg.level if src is None else src.level
    if vocab is not None and vocab.level != level:
        raise UserError(f"vocab is {vocab.level}-level but corpus {name!r} is {level}-level")
    if src is None:
        paths = _text_paths(cfg)
        if level == "byte":
            return _load_byte_files(name, paths)
        return _load_word_files(name, paths, level, vocab, None)
    if src.bundled:
        return _load_bundled(name, vocab)
    folder = fetch_corpus(name, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, mirror=mirror)
    if src.split_sizes is not None:
        return _load_split_file(src, folder)
    paths = {s: folder / f for s, f in zip(SPLITS, src.local, strict=True)}
    return _load_word_files(name, paths, level, vocab, src.space)


