"""Tests for moglstm.lm.generate: the sampler, carried state, and generating from runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moglstm.lm.config import RunConfig, TrainConfig, model_config
from moglstm.lm.generate import check_sampling, generate, sample_ids, sample_next
from moglstm.lm.models import build_model
from moglstm.lm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(data_config, out_dir: Path, name: str = "run") -> Path:
    cfg = RunConfig(
        name=name,
        out_dir=str(out_dir),
        data=data_config,
        model=model_config(kind="mogrifier", hidden_size=16, num_layers=1, mogrify_rounds=2),
        train=TrainConfig(lr=0.01, max_steps=4, eval_every=4, device="cpu"),
    )
    train(cfg, quiet=True)
    return out_dir / name


# --------------------------------------------------------------------------- the sampler

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def draws(n: int = 400, **kw) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {sample_next(LOGITS, generator=generator, **kw) for _ in range(n)}


def test_greedy_takes_the_argmax():
    assert sample_next(torch.tensor([0.1, 3.0, -1.0]), temperature=0) == 1
    assert draws(50, temperature=0) == {0}


def test_plain_sampling_reaches_every_token():
    assert draws() == {0, 1, 2, 3}


def test_top_k_keeps_the_k_most_likely():
    assert draws(top_k=2) == {0, 1}
    assert draws(top_k=1, temperature=5.0) == {0}
    assert draws(top_k=10) == {0, 1, 2, 3}  # more than V keeps everything


def test_top_p_keeps_the_nucleus():
    # cumulative probability before each token: 0, 0.5, 0.8, 0.95
    assert draws(top_p=0.5) == {0}
    assert draws(top_p=0.6) == {0, 1}
    assert draws(top_p=0.85) == {0, 1, 2}
    assert draws(top_p=1.0) == {0, 1, 2, 3}


def test_temperature_sharpens_and_flattens():
    generator = torch.Generator().manual_seed(0)
    cold = [sample_next(LOGITS, temperature=0.2, generator=generator) for _ in range(300)]
    hot = [sample_next(LOGITS, temperature=5.0, generator=generator) for _ in range(300)]
    assert cold.count(0) > hot.count(0)
    assert hot.count(3) > cold.count(3)


def test_seeded_draws_repeat():
    a = [sample_next(LOGITS, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample_next(LOGITS, generator=torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=-0.5), ValueError, "temperature=-0.5"),
        (dict(temperature=math.nan), ValueError, "temperature=nan"),
        (dict(top_k=-1), ValueError, "top_k=-1"),
        (dict(top_p=0.0), ValueError, r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, "top_p=1.5"),
        (dict(top_k=1.5), TypeError, "top_k"),
        (dict(temperature="hot"), TypeError, "temperature"),
    ],
)
def test_bad_sampling_settings(kwargs, error, match):
    settings = dict(temperature=1.0, top_k=0, top_p=1.0) | kwargs
    with pytest.raises(error, match=match):
        check_sampling(**settings)
    with pytest.raises(error, match=match):
        sample_next(LOGITS, **kwargs)


# --------------------------------------------------------------------------- models


def naive_greedy(model, prompt: list[int], n: int, window: int | None = None) -> list[int]:
    """Greedy decoding that re-reads the whole context (or its last `window`) every time."""
    context = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            feed = context if window is None else context[-window:]
            logits, _ = model(torch.tensor(feed).unsqueeze(1), None)
            context.append(int(logits[-1, 0].argmax()))
    return context[len(prompt) :]


@pytest.mark.parametrize("kind", ["mogrifier", "lstm", "gru"])
def test_recurrent_state_is_carried_token_by_token(kind):
    torch.manual_seed(0)
    model = build_model(model_config(kind=kind, hidden_size=12, num_layers=2), 20).eval()
    prompt = [3, 1, 4, 1, 5]
    expected = naive_greedy(model, prompt, 12)
    assert sample_ids(model, prompt, 12, temperature=0) == expected


def test_transformer_rereads_its_last_max_len_tokens():
    torch.manual_seed(0)
    cfg = model_config(kind="transformer", d_model=16, heads=2, depth=1, max_len=6, dropout=0.0)
    model = build_model(cfg, 20).eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]  # longer than max_len already
    expected = naive_greedy(model, prompt, 10, window=6)
    assert sample_ids(model, prompt, 10, temperature=0) == expected


def test_sample_ids_checks_its_arguments():
    model = build_model(model_config(kind="lstm", hidden_size=8, num_layers=1), 10)
    with pytest.raises(ValueError, match="at least one token"):
        sample_ids(model, [], 3)
    with pytest.raises(ValueError, match="num_tokens=0"):
        sample_ids(model, [1], 0)


# --------------------------------------------------------------------------- from a run


def test_generate_from_a_run(word_data_config, tmp_path):
    run_dir = trained(word_data_config, tmp_path)
    result = generate(run_dir, "the cat zebra", 15, seed=1, device="cpu")
    assert result["prompt_tokens"] == ["the", "cat", "<unk>"]
    assert result["unknown"] == 1
    assert len(result["tokens"]) == 15
    assert result["text"].startswith("the cat <unk>")
    assert result["checkpoint"] == str(run_dir / "best.pt")
    again = generate(run_dir, "the cat zebra", 15, seed=1, device="cpu")
    assert again == result
    other = generate(run_dir, "the cat zebra", 15, seed=2, device="cpu")
    assert other["tokens"] != result["tokens"]


def test_greedy_flag_equals_temperature_zero(word_data_config, tmp_path):
    run_dir = trained(word_data_config, tmp_path)
    greedy = generate(run_dir, "the dog", 8, greedy=True, seed=1, device="cpu")
    cold = generate(run_dir, "the dog", 8, temperature=0.0, seed=2, device="cpu")
    assert greedy["tokens"] == cold["tokens"]


def test_empty_prompt_starts_a_fresh_line(word_data_config, tmp_path):
    run_dir = trained(word_data_config, tmp_path)
    result = generate(run_dir, "", 5, seed=0, device="cpu")
    assert result["prompt_tokens"] == []
    assert len(result["tokens"]) == 5
    assert result["text"] == result["continuation"]


def test_char_level_text_is_joined_without_spaces(char_data_config, tmp_path):
    run_dir = trained(char_data_config, tmp_path)
    result = generate(run_dir, "the ca", 20, seed=0, checkpoint="last", device="cpu")
    assert result["prompt_tokens"] == list("the ca")
    assert result["text"].startswith("the ca")
    assert result["text"] == "the ca" + result["continuation"]


def test_generate_rejects_bad_values(word_data_config, tmp_path):
    run_dir = trained(word_data_config, tmp_path)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(run_dir, "the", 5, temperature=-1)
    with pytest.raises(ValueError, match="tokens=0"):
        generate(run_dir, "the", 0)
    with pytest.raises(FileNotFoundError):
        generate(tmp_path / "nothing", "the", 5)


# --------------------------------------------------------------------------- prompts as typed

_PLAY = [
    "ROMEO .",
    "Romeo , where art thou ? I am here -- in the garden .",
    "'Tis the east , and thou art the sun !",
    "O Romeo , Romeo ! wherefore art thou Romeo ?",
]


def test_a_prompt_is_cut_as_the_shakespeare_corpus_was():
    from moglstm.lm.data import Vocab
    from moglstm.lm.data.vocab import split_punctuation

    vocab = Vocab.from_tokens(" ".join(_PLAY).split())
    assert vocab.tokenize_prompt("Romeo, where art thou?") == [
        "Romeo", ",", "where", "art", "thou", "?",
    ]  # fmt: skip
    # known tokens stay whole ('Tis, --), case is kept, unknown words are still words
    assert vocab.tokenize_prompt("'Tis thou--ROMEO. Juliet!") == [
        "'Tis", "thou", "--", "ROMEO", ".", "Juliet", "!",
    ]  # fmt: skip
    assert vocab.tokenize_prompt("romeo\nthe sun") == ["romeo", "<eos>", "the", "sun"]
    # the corpus itself is made with the same rule
    assert all(" ".join(split_punctuation(line)) == line for line in _PLAY)


def test_generate_reads_punctuation_as_the_corpus_has_it(tmp_path, make_text_corpus):
    from moglstm.lm.config import DataConfig

    folder = tmp_path / "play"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text("\n".join(_PLAY * 20) + "\n", encoding="utf-8")
    data = DataConfig(corpus="text", path=str(folder), batch_size=4, bptt=8, eval_batch_size=2)
    run_dir = trained(data, tmp_path)
    result = generate(run_dir, "Romeo, where art thou?", 5, seed=1, device="cpu")
    assert result["prompt_tokens"] == ["Romeo", ",", "where", "art", "thou", "?"]
    assert result["unknown"] == 0 and result["text"].startswith("Romeo , where art thou ?")
    typo = generate(run_dir, "Juliet, wherefore?", 5, seed=1, device="cpu")
    assert typo["prompt_tokens"] == ["<unk>", ",", "wherefore", "?"]
    assert typo["unknown_words"] == [["Juliet", None]]  # named as before
