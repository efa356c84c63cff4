"""Hostile input: code-running checkpoints and YAML, odd bytes in prompts and corpora.

Policy under test (see moglstm.lm.safety): checkpoints are unpickled with
``weights_only=True`` after a CRC check; configs go through ``yaml.safe_load``;
prompts may hold any characters (unknown ones read as ``<unk>``; at byte level,
undecodable command-line bytes are kept as the bytes they were); word- and
character-level corpus files must be UTF-8, and one that is not is a ValueError
naming the file, byte offset and line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from moglstm.cli import main
from moglstm.lm.config import DataConfig, apply_overrides, load_config, model_config, read_config
from moglstm.lm.data import Vocab, load_corpus
from moglstm.lm.evaluate import evaluate
from moglstm.lm.generate import generate
from moglstm.lm.runs.checkpoint import CheckpointError, load_checkpoint
from moglstm.lm.safety import decode_utf8, utf8_bytes

SRC = Path(__file__).resolve().parents[2] / "src" / "moglstm"


pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this creates the folder ``marker``: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    # shaped like a real checkpoint, with the payload where the weights would be
    torch.save({"format_version": 1, "model": Payload(marker), "config": {}}, path)
    return path


# --------------------------------------------------------------------------- code in files


def test_a_pickle_payload_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*holds objects other than tensors"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    live = tmp_path / "live"
    torch.load(_evil_checkpoint(tmp_path / "live.pt", live), weights_only=False)
    assert live.is_dir()


def test_a_raw_pickle_stream_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"raw{protocol}.pt"
        path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
        with pytest.raises(CheckpointError, match="not a complete zip archive"):
            load_checkpoint(path)
    assert not marker.exists()


def test_commands_refuse_a_payload_checkpoint(tmp_path, capsys):
    marker, run = tmp_path / "pwned", tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        _evil_checkpoint(run / name, marker)
    commands = {
        "evaluate": ["evaluate", str(run)],
        "generate": ["generate", str(run), "--prompt", "the"],
        "resume": ["train", "--resume", str(run)],
    }
    for what, argv in commands.items():
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert "holds objects other than tensors" in err and str(run) in err, (what, err)
        assert len(err.strip().splitlines()) <= 3, err  # a message, not a traceback
    assert not marker.exists()


def test_sources_load_only_safely():
    """Every torch.load in the package passes weights_only=True; YAML only safe_load."""
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"torch\.load\(", text):
            closing = text.index(")", call.end())
            assert "weights_only=True" in text[call.end() : closing + 40], path
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), path
        assert "yaml.Loader" not in text and "FullLoader" not in text, path


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.mkdir [{marker}]",
        "!!python/object/new:os.mkdir [{marker}]",
        "!!python/name:os.system",
    ],
)
def test_yaml_python_tags_are_refused(tag, tmp_path, capsys):
    marker = tmp_path / "pwned"
    value = tag.format(marker=json.dumps(str(marker)))
    preset = tmp_path / "evil.yaml"
    preset.write_text(f"name: {value}\n")
    with pytest.raises(ValueError, match="is not valid YAML.*constructor"):
        load_config(preset)
    with pytest.raises(ValueError, match="is not valid YAML"):
        read_config(preset)
    with pytest.raises(ValueError, match="cannot parse the value"):
        load_config(None, [f"train.seed={value}"])
    assert main(["train", "--preset", str(preset), "--print-config"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not marker.exists()


def test_absurdly_nested_yaml_is_a_clear_error(tmp_path):
    deep = "[" * 1500 + "]" * 1500  # deeper than Python's recursion limit
    with pytest.raises(ValueError, match="cannot parse the value"):
        apply_overrides(load_config(), [f"train.betas={deep}"])
    path = tmp_path / "deep.yaml"
    path.write_text(f"train:\n  betas: {deep}\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        read_config(path)


# --------------------------------------------------------------------------- text


def test_invalid_utf8_names_the_file_offset_and_line(tmp_path):
    raw = b"good line\nbad \xff\xfe byte\n"
    with pytest.raises(ValueError, match=r"f\.txt is not valid UTF-8: byte offset 14 \(line 2\)"):
        decode_utf8(raw, "f.txt")
    assert decode_utf8("h\u00e9llo".encode(), "x") == "h\u00e9llo"
    with pytest.raises(TypeError, match="raw"):
        decode_utf8("text", "x")


def test_utf8_bytes_keeps_command_line_bytes():
    assert utf8_bytes("caf\u00e9") == b"caf\xc3\xa9"
    assert utf8_bytes("a\udcff\udc80b") == b"a\xff\x80b"  # surrogateescape of argv bytes
    assert utf8_bytes("x\ud800y") == "x\ufffdy".encode()  # other lone surrogates: U+FFFD
    with pytest.raises(TypeError, match="text"):
        utf8_bytes(b"bytes")


def _corpus(folder: Path, valid: bytes, train: bytes = b"the cat sat .\nthe dog ran .\n" * 30):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_bytes(train)
    (folder / "valid.txt").write_bytes(valid)
    (folder / "test.txt").write_bytes(b"the cat ran .\n" * 5)
    return folder


def test_invalid_utf8_corpus_is_a_clear_error(tmp_path, capsys):
    folder = _corpus(tmp_path / "c", valid=b"the cat\nthe \xc3\x28 dog\n")
    for level in ("word", "char"):
        cfg = DataConfig(corpus="text", path=str(folder), level=level)
        with pytest.raises(ValueError, match=r"valid\.txt is not valid UTF-8: byte offset 12"):
            load_corpus(cfg)
    corpus = load_corpus(DataConfig(corpus="text", path=str(folder), level="byte"))
    assert corpus.valid.tolist()[12:14] == [0xC3, 0x28]  # byte level takes any bytes
    argv = ["train", "data.corpus=text", f"data.path={folder}", "--out-dir", str(tmp_path)]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is not valid UTF-8" in err and "(line 2)" in err and "data.level=byte" in err


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny trained runs, one per level, over a corpus they may rewrite afterwards."""
    from moglstm.lm.config import RunConfig, TrainConfig
    from moglstm.lm.train import train

    base = tmp_path_factory.mktemp("hostile")
    out = {}
    for level in ("word", "char", "byte"):
        folder = _corpus(base / f"corpus-{level}", valid=b"the cat sat .\n" * 20)
        cfg = RunConfig(
            name=level,
            out_dir=str(base / "runs"),
            data=DataConfig(corpus="text", path=str(folder), level=level, batch_size=2, bptt=8),
            model=model_config(kind="lstm", hidden_size=8, num_layers=1),
            train=TrainConfig(max_steps=2, eval_every=2, device="cpu", eval_max_tokens=50),
        )
        train(cfg, quiet=True)
        out[level] = base / "runs" / level
    return out


PROMPTS = [
    "",
    "the cat",
    "zebra quokka",  # unknown words
    "caf\u00e9 \u2603 \U0001f600",  # accents, a snowman, an emoji
    "\x00\x01\x1b[31m\x7f",  # NUL, control characters, an ANSI escape
    "\udcff\udcfe the",  # bytes 0xFF 0xFE from a non-UTF-8 command line
    "x\ud800y",  # a lone surrogate from Python code
    "\n\n\r\n\t ",  # only whitespace and line breaks
    "\u202eevil\u202c \u200b",  # bidirectional override, zero-width space
    "<unk> <eos>",  # the special tokens typed in
    "word " * 2000,  # a long prompt
]


@pytest.mark.parametrize("level", ["word", "char", "byte"])
def test_generation_accepts_any_prompt(level, runs):
    for prompt in PROMPTS:
        if level == "byte" and prompt == "":  # no <eos> to start from: a clear error
            with pytest.raises(ValueError, match="prompt is empty"):
                generate(runs[level], prompt, 5, seed=1, device="cpu")
            continue
        result = generate(runs[level], prompt, 5, seed=1, device="cpu")
        assert len(result["tokens"]) == 5, prompt
        json.dumps(result)  # --json output
        result["text"].encode("utf-8")  # printable: no lone surrogates reach the output
    if level == "byte":
        shown = generate(runs[level], "\udcff\udcfe", 1, seed=1, device="cpu")["prompt_tokens"]
        assert shown == [chr(0xFF), chr(0xFE)]  # the very bytes given
    else:
        assert generate(runs[level], "zebra \u2603", 1, seed=1, device="cpu")["unknown"] > 0


def test_generate_command_with_undecodable_argument_bytes(runs, capsys):
    for level in ("word", "byte"):
        argv = ["generate", str(runs[level]), "--prompt", "the \udcff\udcfe", "--tokens", "3"]
        assert main([*argv, "--seed", "1", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.strip()


ODD_TEXT = (
    "the cat sat .\n"
    "zebra quokka \u2603 \U0001f600 caf\u00e9\n"  # unknown words and characters
    "\x00\x01\x7f the \x1b[0m dog\r\n"  # control characters, a CRLF line end
    "\u202e\u200b \ufeff\n"  # bidi and zero-width characters, a stray BOM
    + "the " * 500
    + "\n"  # a long line
)


@pytest.mark.parametrize("level", ["word", "char", "byte"])
def test_evaluation_accepts_odd_text(level, runs):
    folder = Path(read_config(runs[level] / "config.yaml").data.path)
    (folder / "valid.txt").write_text(ODD_TEXT, encoding="utf-8")
    result = evaluate(runs[level], "valid", batch_size=1, checkpoint="last", device="cpu")
    assert math.isfinite(result["loss"]) and result["tokens"] > 0
    if level != "byte":
        vocab = Vocab.from_dict(torch.load(runs[level] / "last.pt", weights_only=True)["vocab"])
        assert "zebra" not in vocab and "\u2603" not in vocab  # they were read as <unk>
