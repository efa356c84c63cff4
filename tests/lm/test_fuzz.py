"""Fuzzing (hypothesis) the corpus reader, the vocabulary, and config overrides and files.

Every input must end in a result or a clear error: ValueError or TypeError (or one
of the project's own errors), never an exception from deep inside such as
KeyError, IndexError, AttributeError, RecursionError or UnicodeDecodeError.
Runs are derandomized (the same examples every time) and keep no example database.
"""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moglstm.lm.config import (
    DataConfig,
    RunConfig,
    apply_overrides,
    model_config,
    read_config,
    validate,
)
from moglstm.lm.data import CorpusFetchError, Vocab, batchify, load_corpus
from moglstm.lm.evaluate import evaluate_loss
from moglstm.lm.models import RNNLanguageModel

CLEAR_ERRORS = (ValueError, TypeError, CorpusFetchError)
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_clear(exc: BaseException) -> None:
    """A clear error: the right kind, with a message, not a decoding error leaking out."""
    assert isinstance(exc, CLEAR_ERRORS), f"{type(exc).__name__}: {exc}"
    assert not isinstance(exc, UnicodeError), f"{type(exc).__name__}: {exc}"
    assert str(exc).strip(), f"{type(exc).__name__} without a message"
    event(f"clear error: {type(exc).__name__}")  # --hypothesis-show-statistics tallies them


# --------------------------------------------------------------------------- corpora

_LINES = st.lists(
    st.one_of(
        st.text(max_size=30),  # any characters, surrogates excluded by hypothesis' text
        st.sampled_from(["the cat", "<unk>", "<eos>", "", " ", "\t", "\r", "\x00", "\u2028"]),
    ),
    max_size=12,
).map(lambda lines: "\n".join(lines).encode("utf-8"))
_BYTES = st.one_of(_LINES, st.binary(max_size=200))  # valid UTF-8 text, or any bytes


@FUZZ
@given(
    level=st.sampled_from(["word", "char", "byte"]),
    train=_BYTES,
    valid=_BYTES,
    test=_BYTES,
)
def test_corpus_reader_and_scoring_survive_any_bytes(level, train, valid, test):
    with tempfile.TemporaryDirectory() as folder:
        for name, raw in (("train", train), ("valid", valid), ("test", test)):
            Path(folder, f"{name}.txt").write_bytes(raw)
        try:
            corpus = load_corpus(DataConfig(corpus="text", path=folder, level=level))
        except Exception as exc:
            assert_clear(exc)
            return
    event("corpus loaded")
    vocab = corpus.vocab
    for split in (corpus.train, corpus.valid, corpus.test):
        assert split.dtype == torch.long and split.numel() > 0
        assert 0 <= int(split.min()) and int(split.max()) < len(vocab)
    if corpus.valid.numel() < 2:
        with pytest.raises(ValueError, match="corpus too small"):
            batchify(corpus.valid, 1)
        return
    model = RNNLanguageModel(len(vocab), model_config(kind="lstm", hidden_size=4, num_layers=1))
    loss, count = evaluate_loss(model, batchify(corpus.valid, 1), bptt=16)
    assert count == corpus.valid.numel() - 1 and torch.isfinite(torch.tensor(loss))


@FUZZ
@given(
    level=st.sampled_from(["word", "char", "byte"]),
    corpus=st.lists(st.text(max_size=8), min_size=1, max_size=20),
    prompt=st.text(alphabet=st.characters(exclude_categories=()), max_size=60),  # surrogates too
)
def test_vocabulary_takes_any_text(level, corpus, prompt):
    if level == "byte":
        vocab = Vocab.byte_level()
    else:
        vocab = Vocab.from_tokens(corpus, level=level)
    ids = vocab.encode(vocab.tokenize(prompt))
    assert all(0 <= i < len(vocab) for i in ids)
    text = vocab.detokenize(vocab.decode(ids))
    assert isinstance(text, str)
    text.encode("utf-8")  # printable: no lone surrogate survives into output


# --------------------------------------------------------------------------- configs


def _dotted_keys() -> list[str]:
    keys = ["name", "out_dir", "data", "model", "train"]
    for section in ("data", "model", "train"):
        cls = typing.get_type_hints(RunConfig)[section]
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


# YAML that is odd, hostile or wrong for some field: numbers out of range, the wrong
# shapes, tags, recursive aliases, broken syntax, huge and deeply nested values
_ODD_YAML = (
    *("", "0", "-1", "1e-3", "1e400", "nan", "-.inf", "true", "no", "null", "~"),
    *("[0.9, 0.999]", "[1, 2, 3]", "[[]]", "{}", "{a: 1}", "{batch_size: 2}", "{kind: lstm}"),
    *("'quoted'", '"2024"', "2024-01-01", "!!binary aGk=", "!!python/object/apply:os.getcwd []"),
    *("&a [*a]", "*undefined", "[", "{", "|\n  text", ": :", "- x", "0x10", "1_000"),
    *("1" * 5000, "\u00e9", "\x00", "\ud800", "[" * 1200),
)
_PLAUSIBLE = st.one_of(
    st.integers(0, 64).map(str),
    st.floats(0, 1, exclude_max=True).map(repr),
    st.sampled_from(["true", "false", "lstm", "char", "plateau", "skip", "rollback", "cpu"]),
)
_VALUES = st.one_of(st.sampled_from(_ODD_YAML), _PLAUSIBLE, st.text(max_size=20))
_KEYS = st.one_of(st.sampled_from(_dotted_keys()), st.text(max_size=15))
_REAL_KEYS = st.sampled_from(_dotted_keys())
_OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", _KEYS, _VALUES),
        st.builds(lambda k, v: f"{k}={v}", _REAL_KEYS, _PLAUSIBLE),
        st.text(max_size=20),  # not even key=value
    ),
    max_size=3,
)


@settings(FUZZ, max_examples=300)
@given(overrides=_OVERRIDES)
def test_config_overrides_end_in_a_config_or_a_clear_error(overrides):
    try:
        cfg = validate(apply_overrides(RunConfig(), overrides))
    except Exception as exc:
        assert_clear(exc)
        return
    event("valid config")
    assert isinstance(cfg, RunConfig)
    assert apply_overrides(cfg, []) == cfg


_YAML = st.one_of(
    st.builds(
        lambda k, v: f"{k.replace('.', ': {', 1)}: {v}{'}' if '.' in k else ''}\n",
        _KEYS,
        _VALUES,
    ),
    st.text(max_size=80),
).map(lambda text: text.encode("utf-8", "surrogatepass"))


@settings(FUZZ, max_examples=200)
@given(raw=st.one_of(_YAML, st.binary(max_size=80)))
def test_config_files_end_in_a_config_or_a_clear_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "config.yaml")
        path.write_bytes(raw)
        try:
            cfg = validate(read_config(path))
        except Exception as exc:
            assert_clear(exc)
            return
    event("valid config")
    assert isinstance(cfg, RunConfig)
