"""Corpora, downloads, vocabularies and truncated-BPTT batching.

The package's modules, each imported by the next: :mod:`~moglstm.lm.data.sources`
(the registry of named corpora: files, checksums, level, how they read),
:mod:`~moglstm.lm.data.fetch` (finding and downloading them),
:mod:`~moglstm.lm.data.vocab`, :mod:`~moglstm.lm.data.corpus` (reading text into
ids) and :mod:`~moglstm.lm.data.batches`. Everything public is re-exported here.

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
Every file is checked against its SHA-256 in
:data:`~moglstm.lm.data.sources.SHA256` before use.

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

from moglstm.lm.data.batches import BatchStream, batchify, iter_windows
from moglstm.lm.data.corpus import Corpus, bundled_text, load_corpus
from moglstm.lm.data.fetch import (
    ChecksumError,
    CorpusFetchError,
    DownloadError,
    default_cache_dir,
    download,
    fetch_corpus,
    sha256_file,
)
from moglstm.lm.data.sources import (
    BUNDLED,
    CORPORA,
    ENWIK8_SPLIT,
    EOS,
    LEVELS,
    SHA256,
    SOURCES,
    SPLITS,
    UNK,
    CorpusSource,
)
from moglstm.lm.data.vocab import Vocab

__all__ = [
    "BUNDLED",
    "CORPORA",
    "ENWIK8_SPLIT",
    "EOS",
    "LEVELS",
    "SHA256",
    "SOURCES",
    "SPLITS",
    "UNK",
    "BatchStream",
    "ChecksumError",
    "Corpus",
    "CorpusFetchError",
    "CorpusSource",
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
