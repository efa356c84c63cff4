"""Sampling text from a trained language model.

The prompt is tokenized with the corpus vocabulary, punctuation split off words the
vocabulary lacks (:meth:`~moglstm.lm.data.Vocab.tokenize_prompt`; unknown words become
``<unk>``). A recurrent model reads the prompt once and then carries its state
token by token; a Transformer, which keeps no state, re-reads the last
``max_len`` tokens for every new one. Each next token is drawn from the softmax
of the logits divided by ``temperature``, optionally restricted to the ``top_k``
most likely tokens and to the smallest set whose probability reaches ``top_p``
(nucleus sampling); ``temperature=0`` (or ``greedy=True``) takes the most likely
token instead. ``<unk>`` is never generated unless ``allow_unk`` (a model that has
learnt that rare words are ``<unk>`` would otherwise write it often, and greedy
decoding can get stuck repeating it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moglstm.lm.data import Vocab
from moglstm.lm.errors import UserError
from moglstm.lm.runs.folder import load_run
from moglstm.lm.safety import short_repr

__all__ = [
    "check_sampling",
    "generate",
    "sample_ids",
    "sample_next",
    "unknown_words",
    "unknown_words_message",
]


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ``ValueError``/``TypeError`` naming a bad sampling setting.

    Args:
        temperature: ``>= 0``; 0 means greedy.
        top_k: ``>= 0``; 0 keeps every token.
        top_p: in ``(0, 1]``; 1 keeps every token.
    """
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {short_repr(value)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {short_repr(top_k)}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UserError(f"temperature={short_repr(temperature)} must be a finite number >= 0")
    if top_k < 0:
        raise UserError(f"top_k={short_repr(top_k)} must be >= 0 (0 keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={short_repr(top_p)} must be in (0, 1] (1 keeps every token)")


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from next-token ``logits``.

    Args:
        logits: shape ``(V,)``.
        temperature: divides the logits; ``0`` takes the argmax.
        top_k: keep only the ``top_k`` most likely tokens (``0``: all).
        top_p: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (``1``: all).
        generator: a CPU generator for reproducible draws.
    """
    check_sampling(temperature, top_k, top_p)
    if logits.dim() != 1:
        raise UserError(f"logits must have shape (V,), got {tuple(logits.shape)}")
    logits = logits.detach().double().cpu()
    if bool(torch.isnan(logits).any()):
        raise UserError("the model's next-token scores hold NaN: its weights are damaged")
    if temperature == 0:
        return int(logits.argmax())
    # shift the largest logit to 0 first: a tiny temperature then sends the others to
    # -inf (probability 0) instead of overflowing every logit to inf (NaN probabilities)
    logits = (logits - logits.max()) / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=0)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(0) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    probs = torch.softmax(logits, dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    prompt: list[int],
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    exclude: Sequence[int] = (),
) -> list[int]:
    """Continue ``prompt`` (token ids) with ``num_tokens`` sampled ids.

    Args:
        model: a language model from :mod:`moglstm.lm.models` (put in eval mode here).
        prompt: at least one token id.
        num_tokens: how many ids to generate.
        temperature, top_k, top_p, generator: as in :func:`sample_next`.
        exclude: ids never generated (e.g. ``<unk>``'s).

    Returns:
        The generated ids only (not the prompt).
    """
    check_sampling(temperature, top_k, top_p)
    if not prompt:
        raise UserError("prompt: need at least one token to start from")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise UserError(f"num_tokens={short_repr(num_tokens)} must be an int >= 1")
    model.eval()
    device = next(model.parameters()).device
    stateful = getattr(model, "stateful", True)
    max_len = None if stateful else model.max_len
    context = list(prompt)
    banned = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    out: list[int] = []
    state = None
    feed = context if stateful else context[-max_len:]  # the whole prompt, once
    for _ in range(num_tokens):
        tokens = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1)  # (T, 1)
        logits, state = model(tokens, state if stateful else None)  # (T, 1, V)
        last = logits[-1, 0]
        if exclude:
            last = last.index_fill(0, banned.to(last.device), -math.inf)
        token = sample_next(
            last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        out.append(token)
        context.append(token)
        # a recurrent model carries its state: feed only the new token; a Transformer
        # re-reads its window of the latest max_len tokens
        feed = [token] if stateful else context[-max_len:]
    return out


def generate(
    run: str | Path,
    prompt: str,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    greedy: bool = False,
    checkpoint: str = "best",
    device: str = "auto",
    allow_unk: bool = False,
) -> dict[str, Any]:
    """Load a trained run and continue ``prompt`` with ``num_tokens`` sampled tokens.

    Args:
        run: a run folder or a checkpoint file.
        prompt: text in the corpus's style (words, characters or bytes). Empty text
            starts a fresh line (from ``<eos>``).
        num_tokens: how many tokens to generate.
        temperature, top_k, top_p: as in :func:`sample_next`.
        seed: seed of the sampler, for repeatable output; ``None`` draws one.
        greedy: take the most likely token every time (same as ``temperature=0``).
        checkpoint: ``"best"`` or ``"last"`` (for a run folder).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        allow_unk: let the model generate ``<unk>`` (by default it never does).

    Returns:
        ``{"text": prompt + continuation, "continuation": the generated text alone,
        "tokens": the generated tokens, "prompt_tokens": the prompt's tokens as the
        model saw them, "unknown": how many prompt tokens became <unk>,
        "unknown_words": each distinct one with the known word to try instead (or
        ``None``), see :func:`unknown_words`, "checkpoint": path}``.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
    check_sampling(temperature, top_k, top_p)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise UserError(f"tokens={short_repr(num_tokens)} must be an int >= 1")
    loaded = load_run(run, checkpoint, device)
    vocab = loaded.vocab
    tokens = vocab.tokenize_prompt(prompt)  # punctuation split off as the corpus has it
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    ids = sample_ids(
        loaded.model,
        vocab.encode(_start_tokens(vocab, tokens)),
        num_tokens,
        temperature=0.0 if greedy else temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        exclude=() if allow_unk or vocab.unk_id is None else (vocab.unk_id,),
    )
    shown = vocab.decode(vocab.encode(tokens))  # unknown tokens shown as <unk>
    generated = vocab.decode(ids)
    return {
        "text": vocab.detokenize(shown + generated),
        "continuation": vocab.detokenize(generated),
        "tokens": generated,
        "prompt_tokens": shown,
        "unknown": sum(t not in vocab for t in tokens),
        "unknown_words": unknown_words(vocab, tokens),
        "checkpoint": str(loaded.checkpoint),
    }


_NUMBER = re.compile(r"[\d.,:/-]*\d[\d.,:/-]*")


def unknown_words(vocab: Vocab, tokens: Sequence[str]) -> list[list[str | None]]:
    """``[word, suggestion]`` for each distinct token of ``tokens`` that ``vocab`` lacks.

    The suggestion is a known token that is probably meant: the word in lowercase (Penn
    Treebank is lowercase), ``N`` for a number (PTB writes every number as ``N``), or
    ``None``.
    """
    out: list[list[str | None]] = []
    seen = set()
    for token in tokens:
        if token in vocab or token in seen:
            continue
        seen.add(token)
        suggestion = None
        if token.lower() in vocab:
            suggestion = token.lower()
        elif _NUMBER.fullmatch(token) and "N" in vocab:
            suggestion = "N"
        out.append([token, suggestion])
    return out


def unknown_words_message(result: dict[str, Any], shown: int = 10) -> str:
    """One line naming the prompt words a :func:`generate` result read as ``<unk>``."""
    words = result["unknown_words"]
    parts = [
        repr(word) + (f" (try {suggestion!r})" if suggestion else "")
        for word, suggestion in words[:shown]
    ]
    more = f" and {len(words) - shown} more" if len(words) > shown else ""
    return (
        f"{len(words)} prompt word(s) unknown to the model, read as <unk>: "
        f"{', '.join(parts)}{more}"
    )


def _start_tokens(vocab: Vocab, tokens: list[str]) -> list[str]:
    if tokens:
        return tokens
    if vocab.eos is None:
        raise UserError("prompt is empty: give some text to start from")
    return [vocab.eos]  # start of a fresh line
