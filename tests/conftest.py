"""Shared fixtures: tiny corpora written into temp folders, and the real corpora if present.

Every test runs with ``MOGLSTM_DATA`` unset, ``MOGLSTM_CACHE`` pointing at a fresh temp
folder and ``MOGLSTM_MIRROR`` pointing at a closed local port, so no test reads a
user's data, writes to ``~/.cache`` or reaches the internet by accident.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Triton's kernels run under its interpreter where there is no GPU (tests/nn/test_triton.py).
# Triton reads the variable when a kernel is decorated, its own library's included: it must
# be set before anything (a test module, torch.compile) first imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# a tiny grammar with number agreement: enough structure for an LSTM to learn a little
_DET = {"sg": ["the", "a", "every"], "pl": ["the", "some", "many"]}
_NOUN = {
    "sg": ["cat", "dog", "bird", "child", "teacher"],
    "pl": ["cats", "dogs", "birds", "children", "teachers"],
}
_VERB = {"sg": ["sees", "likes", "chases", "finds"], "pl": ["see", "like", "chase", "find"]}
_ADJ = ["big", "small", "red", "happy", "old"]
_PLACE = ["in the park", "at home", "near the river"]


def _noun_phrase(rng: random.Random, number: str) -> list[str]:
    words = [rng.choice(_DET[number])]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADJ))
    return [*words, rng.choice(_NOUN[number])]


def grammar_sentence(rng: random.Random) -> str:
    """One sentence of the synthetic grammar, words separated by single spaces."""
    number = rng.choice(["sg", "pl"])
    words = _noun_phrase(rng, number) + [rng.choice(_VERB[number])]
    words += _noun_phrase(rng, rng.choice(["sg", "pl"]))
    if rng.random() < 0.3:
        words += rng.choice(_PLACE).split()
    return " ".join([*words, "."])


def write_text_corpus(
    folder: Path, *, n_train: int = 300, n_valid: int = 60, n_test: int = 60, seed: int = 0
) -> Path:
    """Write ``train.txt valid.txt test.txt`` of grammar sentences (one per line)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [grammar_sentence(rng) for _ in range(n)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _isolated_moglstm_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.delenv("MOGLSTM_DATA", raising=False)
    monkeypatch.setenv("MOGLSTM_CACHE", str(tmp_path_factory.mktemp("moglstm-cache")))
    monkeypatch.setenv("MOGLSTM_MIRROR", f"http://127.0.0.1:{_closed_port()}/")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module (``pytestmark = usefixtures("one_thread")``):
    tiny models wait on each other's threads more than they compute, and on a shared machine
    one thread keeps their run times steady."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A local port nothing listens on, for a test's own server (torchrun's rendezvous)."""
    return _closed_port()


@pytest.fixture
def make_text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``make_text_corpus(n_train=300, n_valid=60, n_test=60, seed=0) -> folder``."""

    def make(**kwargs: int) -> Path:
        return write_text_corpus(tmp_path_factory.mktemp("corpus"), **kwargs)

    return make


@pytest.fixture
def word_corpus_dir(make_text_corpus: Callable[..., Path]) -> Path:
    """A folder with train/valid/test.txt: 300/60/60 lines of a small synthetic grammar."""
    return make_text_corpus()


@pytest.fixture
def char_corpus_dir(make_text_corpus: Callable[..., Path]) -> Path:
    """A smaller folder (120/30/30 lines) of the same grammar, meant for ``level="char"``."""
    return make_text_corpus(n_train=120, n_valid=30, n_test=30, seed=1)


@pytest.fixture
def word_data_config(word_corpus_dir: Path):
    """``DataConfig`` for :func:`word_corpus_dir` at word level, tiny batches."""
    from moglstm.lm.config import DataConfig

    return DataConfig(
        corpus="text",
        path=str(word_corpus_dir),
        level="word",
        batch_size=4,
        bptt=8,
        eval_batch_size=2,
    )


@pytest.fixture
def char_data_config(char_corpus_dir: Path):
    """``DataConfig`` for :func:`char_corpus_dir` at char level, tiny batches."""
    from moglstm.lm.config import DataConfig

    return DataConfig(
        corpus="text",
        path=str(char_corpus_dir),
        level="char",
        batch_size=4,
        bptt=16,
        eval_batch_size=2,
    )


@pytest.fixture
def tiny_named_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A data folder holding tiny ``ptb``, ``ptb-char``, ``wikitext-2`` and ``enwik8``.

    The checksum table and the enwik8 split sizes of :mod:`moglstm.lm.data` are patched
    to match, so ``DataConfig(corpus="ptb", data_dir=str(folder))`` etc. load them.
    enwik8 is 3,000 bytes split 2,400 / 300 / 300.
    """
    from moglstm.lm import data
    from moglstm.lm.data import sources

    root = tmp_path_factory.mktemp("named-data")
    src = write_text_corpus(tmp_path_factory.mktemp("grammar"), n_train=200, seed=2)
    sums = {}
    for split in ("train", "valid", "test"):
        lines = (src / f"{split}.txt").read_text().splitlines()
        files = {
            "ptb": "".join(f" {line} \n" for line in lines),
            "ptb-char": "".join(f" {' '.join(line.replace(' ', '_'))} \n" for line in lines),
            "wikitext-2": "".join(f" {line} \n \n" for line in lines),
        }
        for name, text in files.items():
            path = root / name / f"{split}.txt"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            sums[f"{name}/{split}.txt"] = data.sha256_file(path)
    raw = bytes(random.Random(3).randrange(256) for _ in range(3000))
    (root / "enwik8").mkdir()
    (root / "enwik8" / "enwik8").write_bytes(raw)
    sums["enwik8/enwik8"] = data.sha256_file(root / "enwik8" / "enwik8")
    monkeypatch.setattr(sources, "SHA256", {**sources.SHA256, **sums})
    enwik8 = replace(sources.SOURCES["enwik8"], split_sizes=(2400, 300, 300))
    monkeypatch.setitem(sources.SOURCES, "enwik8", enwik8)
    return root


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real corpora (``ptb/``, ``ptb-char/``, ``wikitext-2/``); skips when absent.

    Looked up in ``$MOGLSTM_TEST_DATA``, else ``shared/data`` beside the repository.
    """
    env = os.environ.get("MOGLSTM_TEST_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "ptb" / "train.txt").is_file():
        where = f"$MOGLSTM_TEST_DATA={env} has no ptb/train.txt" if env else "not set up"
        pytest.skip(
            f"real corpora: {where}; set MOGLSTM_TEST_DATA to a folder laid out like "
            "data.data_dir (ptb/, ptb-char/, wikitext-2/) to run these tests"
        )
    return path
