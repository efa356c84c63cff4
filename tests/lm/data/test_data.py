"""Vocabulary, corpus loading and batching (local files only; no network)."""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moglstm.lm import data
from moglstm.lm.config import DataConfig
from moglstm.lm.data import (
    EOS,
    SHA256,
    UNK,
    BatchStream,
    ChecksumError,
    Corpus,
    Vocab,
    batchify,
    iter_windows,
    load_corpus,
    sha256_file,
    sources,
)


def write_splits(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- Vocab


def test_vocab_from_tokens_orders_by_frequency_and_adds_specials():
    v = Vocab.from_tokens("b a b c b a".split())
    assert v.tokens == ("b", "a", "c", EOS, UNK)
    assert len(v) == 5 and v.eos_id == 3 and v.unk_id == 4
    assert "a" in v and "z" not in v


def test_vocab_keeps_existing_specials():
    v = Vocab.from_tokens(["x", UNK, EOS, "x"])
    assert v.tokens == ("x", UNK, EOS)


def test_vocab_encode_maps_unknown_to_unk_and_decode_inverts():
    v = Vocab.from_tokens("the cat sat".split())
    ids = v.encode(["the", "dog", "sat"])
    assert ids == [v.encode(["the"])[0], v.unk_id, v.encode(["sat"])[0]]
    assert v.decode(ids) == ["the", UNK, "sat"]
    assert v.decode(torch.tensor(ids)) == ["the", UNK, "sat"]
    assert v.encode(iter(["cat"])) == v.encode(["cat"])


def test_vocab_argument_errors():
    with pytest.raises(ValueError, match="distinct"):
        Vocab(["a", "a"], unk=None, eos=None)
    with pytest.raises(ValueError, match="unk token"):
        Vocab(["a"], eos=None)
    with pytest.raises(ValueError, match="level"):
        Vocab(["a"], level="sentence", unk=None, eos=None)
    with pytest.raises(TypeError):
        Vocab("abc")
    with pytest.raises(TypeError):
        Vocab.from_tokens(["a"]).encode("a")
    with pytest.raises(ValueError, match="out of range"):
        Vocab.from_tokens(["a"]).decode([7])


def test_word_tokenize_detokenize_roundtrip():
    v = Vocab.from_tokens("the cat sat <eos>".split())
    toks = v.tokenize("the  cat\nsat ")
    assert toks == ["the", "cat", EOS, "sat"]
    assert v.detokenize(toks) == "the cat\nsat"


def test_char_tokenize_plain_and_with_word_separator():
    plain = Vocab.from_tokens(list("ab c"), level="char")
    assert plain.tokenize("a b\nc") == ["a", " ", "b", EOS, "c"]
    assert plain.detokenize(plain.tokenize("a b\nc")) == "a b\nc"
    ptb_char = Vocab.from_tokens(list("ab_c"), level="char", space="_")
    assert ptb_char.tokenize("ab  c") == ["a", "b", "_", "c"]
    assert ptb_char.detokenize(["a", "b", "_", "c", EOS]) == "ab c\n"


def test_byte_vocab_is_closed_and_covers_utf8():
    v = Vocab.byte_level()
    assert len(v) == 256 and v.unk is None and v.eos is None
    toks = v.tokenize("é!")
    assert v.encode(toks) == list("é!".encode())
    assert v.detokenize(toks) == "é!"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode(["ab"])


def test_vocab_roundtrips_through_plain_data_and_weights_only_load():
    v = Vocab.from_tokens(list("ab_c"), level="char", space="_")
    buf = io.BytesIO()
    torch.save({"vocab": v.to_dict()}, buf)
    buf.seek(0)
    restored = Vocab.from_dict(torch.load(buf, weights_only=True)["vocab"])
    assert restored == v and restored.space == "_" and restored.level == "char"
    assert Vocab.from_dict(Vocab.byte_level().to_dict()) == Vocab.byte_level()
    with pytest.raises(ValueError, match="lacks"):
        Vocab.from_dict({"tokens": ["a"]})


# --------------------------------------------------------------------------- text corpora


def test_word_corpus_fixture_loads(word_data_config):
    c = load_corpus(word_data_config)
    assert isinstance(c, Corpus) and c.name == "text" and c.level == "word"
    for split in ("train", "valid", "test"):
        ids = c.split(split)
        assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 0
    n_lines = len((Path(word_data_config.path) / "train.txt").read_text().splitlines())
    assert (c.train == c.vocab.eos_id).sum().item() == n_lines
    assert UNK in c.vocab
    assert (c.valid == c.vocab.unk_id).sum().item() == 0  # the grammar is closed
    with pytest.raises(ValueError, match="split must be"):
        c.split("dev")


def test_char_corpus_fixture_uses_every_character(char_data_config):
    c = load_corpus(char_data_config)
    assert c.level == "char" and " " in c.vocab and EOS in c.vocab
    first_line = (Path(char_data_config.path) / "train.txt").read_text().split("\n")[0]
    assert c.vocab.decode(c.train[: len(first_line) + 1]) == [*first_line, EOS]


def test_vocab_comes_from_train_and_unknowns_map_to_unk(tmp_path):
    folder = write_splits(tmp_path, "a b\nb c\n", "a zebra\n", "q\n")
    c = load_corpus(DataConfig(corpus="text", path=str(folder)))
    assert "zebra" not in c.vocab and UNK in c.vocab
    assert c.vocab.decode(c.valid) == ["a", UNK, EOS]
    assert c.vocab.decode(c.test) == [UNK, EOS]


def test_every_line_gets_eos_but_not_a_trailing_blank_piece(tmp_path):
    folder = write_splits(tmp_path, " x \n \n y \n ", "x", "y\n\n")
    c = load_corpus(DataConfig(corpus="text", path=str(folder)))
    assert c.vocab.decode(c.train) == ["x", EOS, EOS, "y", EOS]
    assert c.vocab.decode(c.valid) == ["x", EOS]  # no final newline: still a line
    assert c.vocab.decode(c.test) == ["y", EOS, EOS]


def test_explicit_paths_override_folder(tmp_path):
    folder = write_splits(tmp_path / "a", "x y\n", "x\n", "y\n")
    other = tmp_path / "other_test.txt"
    other.write_text("y y y\n")
    cfg = DataConfig(corpus="text", path=str(folder), test_path=str(other))
    assert load_corpus(cfg).test.numel() == 4
    only_explicit = DataConfig(
        corpus="text",
        train_path=str(folder / "train.txt"),
        valid_path=str(folder / "valid.txt"),
        test_path=str(other),
    )
    assert load_corpus(only_explicit).train.numel() == 3


def test_text_at_byte_level(tmp_path):
    folder = write_splits(tmp_path, "héllo\n", "ab", "c")
    c = load_corpus(DataConfig(corpus="text", path=str(folder), level="byte"))
    assert c.level == "byte" and len(c.vocab) == 256
    assert c.train.tolist() == list("héllo\n".encode())


def test_load_corpus_with_given_vocab(tmp_path):
    folder = write_splits(tmp_path, "a b\n", "b\n", "c\n")
    vocab = Vocab.from_tokens(["c", "b", "a"])
    c = load_corpus(DataConfig(corpus="text", path=str(folder)), vocab=vocab)
    assert c.vocab is vocab and c.test.tolist() == [0, vocab.eos_id]
    with pytest.raises(ValueError, match="byte-level but corpus .text. is word-level"):
        load_corpus(DataConfig(corpus="text", path=str(folder)), vocab=Vocab.byte_level())


def test_empty_file_is_named(tmp_path):
    folder = write_splits(tmp_path, "a b\n", " \n\n", "a\n")
    with pytest.raises(ValueError, match=r"valid\.txt is empty"):
        load_corpus(DataConfig(corpus="text", path=str(folder)))


def test_missing_file_is_named(tmp_path):
    folder = write_splits(tmp_path, "a\n", "a\n", "a\n")
    (folder / "test.txt").unlink()
    with pytest.raises(ValueError, match=r"test\.txt does not exist"):
        load_corpus(DataConfig(corpus="text", path=str(folder)))
    with pytest.raises(ValueError, match="path"):
        load_corpus(DataConfig(corpus="text"))


def test_unknown_corpus_and_level(tmp_path):
    with pytest.raises(ValueError, match="ptb, ptb-char, wikitext-2, enwik8, text"):
        load_corpus(DataConfig(corpus="penn"))
    with pytest.raises(ValueError, match="level"):
        load_corpus(DataConfig(corpus="text", path=str(tmp_path), level="bpe"))
    with pytest.raises(TypeError):
        load_corpus({"corpus": "ptb"})


# --------------------------------------------------------------------------- named corpora


def test_named_corpora_from_data_dir(tiny_named_data_dir):
    root = str(tiny_named_data_dir)
    ptb = load_corpus(DataConfig(corpus="ptb", data_dir=root))
    assert ptb.level == "word" and ptb.vocab.space is None
    n_lines = len((tiny_named_data_dir / "ptb" / "train.txt").read_text().splitlines())
    assert (ptb.train == ptb.vocab.eos_id).sum().item() == n_lines

    char = load_corpus(DataConfig(corpus="ptb-char", data_dir=root))
    assert char.level == "char" and char.vocab.space == "_" and " " not in char.vocab
    assert char.vocab.tokenize("the cat") == list("the_cat")
    # the same text as ptb, spelled out: one <eos> per line, '_' between words
    first = ptb.vocab.detokenize(ptb.vocab.decode(ptb.train[:20])).split("\n")[0]
    assert char.vocab.detokenize(char.vocab.decode(char.train[: len(first)])) == first

    wiki = load_corpus(DataConfig(corpus="wikitext-2", data_dir=root))
    assert (wiki.train == wiki.vocab.eos_id).sum().item() == 2 * n_lines


def test_enwik8_raw_split(tiny_named_data_dir):
    c = load_corpus(DataConfig(corpus="enwik8", data_dir=str(tiny_named_data_dir)))
    raw = (tiny_named_data_dir / "enwik8" / "enwik8").read_bytes()
    assert c.level == "byte" and len(c.vocab) == 256
    assert [c.train.numel(), c.valid.numel(), c.test.numel()] == [2400, 300, 300]
    assert c.valid.tolist() == list(raw[2400:2700]) and c.test.tolist() == list(raw[2700:])


def test_enwik8_zip_and_wrong_size(tiny_named_data_dir, tmp_path, monkeypatch):
    raw = (tiny_named_data_dir / "enwik8" / "enwik8").read_bytes()
    (tmp_path / "enwik8").mkdir()
    zip_path = tmp_path / "enwik8" / "enwik8.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("enwik8", raw)
    monkeypatch.setitem(sources.SHA256, "enwik8/enwik8.zip", sha256_file(zip_path))
    c = load_corpus(DataConfig(corpus="enwik8", data_dir=str(tmp_path)))
    assert c.train.tolist() == list(raw[:2400])
    enwik8 = replace(sources.SOURCES["enwik8"], split_sizes=(2000, 300, 300))
    monkeypatch.setitem(sources.SOURCES, "enwik8", enwik8)
    with pytest.raises(ValueError, match="3,000 bytes, expected 2,600"):
        load_corpus(DataConfig(corpus="enwik8", data_dir=str(tmp_path)))


def test_data_dir_checksum_mismatch_and_missing_file(tiny_named_data_dir):
    root = tiny_named_data_dir
    with (root / "ptb" / "valid.txt").open("a") as f:
        f.write("extra\n")
    with pytest.raises(ChecksumError, match=r"ptb/valid\.txt"):
        load_corpus(DataConfig(corpus="ptb", data_dir=str(root)))
    (root / "wikitext-2" / "test.txt").unlink()
    with pytest.raises(ValueError, match=r"wikitext-2/test\.txt does not exist"):
        load_corpus(DataConfig(corpus="wikitext-2", data_dir=str(root)))
    with pytest.raises(ValueError, match="missing enwik8"):
        load_corpus(DataConfig(corpus="enwik8", data_dir=str(root / "ptb")))


def test_moglstm_data_env_is_used(tiny_named_data_dir, monkeypatch):
    monkeypatch.setenv("MOGLSTM_DATA", str(tiny_named_data_dir))
    c = load_corpus(DataConfig(corpus="ptb"))
    assert c.train.numel() > 0


# --------------------------------------------------------------------------- batching


def test_batchify_makes_time_major_contiguous_streams():
    ids = torch.arange(23)
    out = batchify(ids, 4)
    assert out.shape == (5, 4) and out.is_contiguous()
    assert out[:, 1].tolist() == [5, 6, 7, 8, 9]  # stream 1 is a contiguous chunk
    assert out.t().reshape(-1).tolist() == list(range(20))  # 3 trailing tokens dropped


def test_batchify_errors():
    with pytest.raises(ValueError, match="corpus too small: 7 tokens"):
        batchify(torch.arange(7), 4)
    with pytest.raises(TypeError, match="batch_size"):
        batchify(torch.arange(7), 2.0)
    with pytest.raises(ValueError, match="batch_size"):
        batchify(torch.arange(7), 0)
    with pytest.raises(TypeError, match="ids"):
        batchify([1, 2, 3], 1)
    with pytest.raises(ValueError, match="1-D integer"):
        batchify(torch.rand(10), 2)


def test_iter_windows_covers_the_split_once():
    data2d = batchify(torch.arange(40), 2)  # (20, 2)
    windows = list(iter_windows(data2d, 6))
    assert [x.shape[0] for x, _ in windows] == [6, 6, 6, 1]
    for x, y in windows:
        assert x.shape == y.shape and torch.equal(y[:-1], x[1:])
    inputs = torch.cat([x for x, _ in windows])
    targets = torch.cat([y for _, y in windows])
    assert torch.equal(inputs, data2d[:-1]) and torch.equal(targets, data2d[1:])
    capped = list(iter_windows(data2d, 6, max_tokens=15))  # 15 tokens -> 8 rows of 2
    assert sum(x.numel() for x, _ in capped) == 16


def test_batch_stream_fixed_windows_wrap_around():
    data2d = batchify(torch.arange(44), 2)  # (22, 2): 21 target steps per pass
    stream = BatchStream(data2d, 5)
    flags, lengths = [], []
    for _ in range(12):
        x, y, new_epoch = stream.next()
        assert x.shape == y.shape and torch.equal(y[:-1], x[1:])
        if new_epoch:  # every pass starts again at the beginning of the streams
            assert torch.equal(x, data2d[:5]) and torch.equal(y, data2d[1:6])
        flags.append(new_epoch)
        lengths.append(x.shape[0])
    assert lengths == [5, 5, 5, 5, 1] * 2 + [5, 5]
    assert flags == [True, False, False, False, False] * 2 + [True, False]
    assert stream.epoch == 2


def test_batch_stream_one_pass_matches_iter_windows():
    data2d = batchify(torch.arange(100), 4)
    stream = BatchStream(data2d, 7)
    for x_ref, y_ref in iter_windows(data2d, 7):
        x, y, _ = next(stream)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert stream.next()[2] is True


def test_batch_stream_variable_lengths_are_seeded_and_bounded():
    data2d = batchify(torch.arange(100_000), 2)

    def lengths(seed: int) -> list[int]:
        stream = BatchStream(data2d, 70, variable_length=True, seed=seed)
        return [stream.next()[0].shape[0] for _ in range(400)]

    a = lengths(1)
    assert a == lengths(1) and a != lengths(2)
    assert min(a) >= 5 and max(a) <= 90
    assert any(n < 50 for n in a)  # the bptt/2 base shows up (p = .05 per window)
    assert 60 < sum(a) / len(a) < 72


def test_batch_stream_resumes_exactly(tmp_path):
    data2d = batchify(torch.arange(3000), 3)
    for variable in (False, True):
        ref = BatchStream(data2d, 20, variable_length=variable, seed=5)
        for _ in range(60):  # past one epoch
            ref.next()
        torch.save({"stream": ref.state_dict()}, tmp_path / "s.pt")
        expected = [ref.next() for _ in range(70)]

        resumed = BatchStream(data2d, 20, variable_length=variable, seed=999)
        resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["stream"])
        assert resumed.epoch == 1
        for x_ref, y_ref, flag_ref in expected:
            x, y, flag = resumed.next()
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref) and flag == flag_ref


def test_batch_stream_errors():
    data2d = batchify(torch.arange(40), 4)  # (10, 4)
    with pytest.raises(ValueError, match=r"10 steps per stream .* bptt=12 needs at least 13"):
        BatchStream(data2d, 12)
    with pytest.raises(ValueError, match="2-D"):
        BatchStream(torch.arange(40), 3)
    with pytest.raises(TypeError, match="bptt"):
        BatchStream(data2d, 3.5)
    stream = BatchStream(data2d, 3)
    with pytest.raises(ValueError, match="lacks"):
        stream.load_state_dict({"position": 0})
    state = stream.state_dict()
    with pytest.raises(ValueError, match="past the end"):
        stream.load_state_dict({**state, "position": 50})


# --------------------------------------------------------------------------- real corpora


@pytest.mark.parametrize(
    ("name", "vocab_size", "train_tokens", "lines"),
    [
        ("ptb", 10_000, 929_589, 42_068),
        ("wikitext-2", 33_278, 2_088_628, 36_718),
        ("ptb-char", 51, 5_017_482, 42_068),  # 49 characters, '_', <eos> ... and <unk>
    ],
)
def test_real_corpora(shared_data_dir, name, vocab_size, train_tokens, lines):
    for split in ("train", "valid", "test"):
        assert sha256_file(shared_data_dir / name / f"{split}.txt") == SHA256[f"{name}/{split}.txt"]
    c = load_corpus(DataConfig(corpus=name, data_dir=str(shared_data_dir)))
    assert len(c.vocab) == vocab_size
    assert c.train.numel() == train_tokens
    assert (c.train == c.vocab.eos_id).sum().item() == lines
    assert UNK in c.vocab


def test_real_ptb_valid_is_in_vocabulary(shared_data_dir):
    c = load_corpus(DataConfig(corpus="ptb", data_dir=str(shared_data_dir)))
    literal_unk = (shared_data_dir / "ptb" / "valid.txt").read_text().split().count(UNK)
    assert (c.valid == c.vocab.unk_id).sum().item() == literal_unk  # no other OOV words
    assert c.valid.numel() == 73_760 and c.test.numel() == 82_430


def test_conftest_configs_batch_end_to_end(word_data_config, char_data_config):
    for cfg in (word_data_config, char_data_config):
        corpus = load_corpus(cfg)
        stream = BatchStream(batchify(corpus.train, cfg.batch_size), cfg.bptt, seed=1)
        x, y, new_epoch = stream.next()
        assert x.shape == (cfg.bptt, cfg.batch_size) and new_epoch
        valid = batchify(corpus.valid, cfg.eval_batch_size)
        assert sum(y.numel() for _, y in iter_windows(valid, cfg.bptt)) == valid.numel() - 2


def test_docstring_examples():
    import doctest

    assert doctest.testmod(data).failed == 0


# --------------------------------------------------------------------------- bundled corpus


def test_bundled_shakespeare_loads_offline_with_its_documented_sizes():
    corpus = load_corpus(DataConfig(corpus="shakespeare"))
    assert (corpus.name, corpus.level) == ("shakespeare", "word")
    # the figures corpora/shakespeare/README.md gives
    assert [corpus.split(s).numel() for s in ("train", "valid", "test")] == [
        372_424,
        26_661,
        25_424,
    ]
    assert len(corpus.vocab) == 17_842  # the training split's words, <eos> and <unk>
    text = corpus.vocab.detokenize(corpus.vocab.decode(corpus.valid[:40]))
    # Macbeth's names never occur in the ten training plays: <unk>
    assert text.startswith("<unk>\nby William Shakespeare\n")
    assert data.bundled_text("shakespeare", "valid").startswith("MACBETH\nby William")
    assert data.bundled_text("shakespeare", "test").startswith("THE TEMPEST")


def test_bundled_corpus_files_ship_with_their_licence_and_stay_small():
    from importlib import resources

    folder = resources.files("moglstm.lm") / "corpora" / "shakespeare"
    notice = (folder / "README.md").read_text("utf-8")
    assert "public domain" in notice and "Creative Commons Attribution 2.5" in notice
    sizes = [(folder / f"{s}.txt.xz").read_bytes().__len__() for s in ("train", "valid", "test")]
    assert sum(sizes) < 1 << 20  # compressed, well under 1 MiB


def test_bundled_corpus_that_does_not_verify_is_an_error(monkeypatch):
    monkeypatch.setattr(sources, "SHA256", dict.fromkeys(sources.SHA256, "0" * 64))
    with pytest.raises(ChecksumError, match="bundled shakespeare train split"):
        load_corpus(DataConfig(corpus="shakespeare"))


def test_bundled_corpus_is_not_downloaded():
    with pytest.raises(ValueError, match="bundled with the package"):
        data.fetch_corpus("shakespeare")
