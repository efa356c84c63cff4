"""Scoring a language model on a split, and loading trained runs back.

The protocol is the usual one for recurrent language models: the split is cut into
``B`` contiguous streams (:func:`~moglstm.lm.data.batchify`), scored window by window
with the model state carried from one window to the next (starting from zeros), and
the loss is the mean cross-entropy over every scored token. With ``B = 1`` every
token but the first is scored, as in the Mogrifier paper; with larger ``B`` the
``len % B`` trailing tokens are trimmed and the first token of each stream has no
context, so ``B - 1 + len % B`` tokens go unscored (reported as ``tokens_dropped``).
The Transformer keeps no state, so each of its windows is scored from scratch.

Word-level corpora report perplexity ``exp(loss)``; character- and byte-level ones
report bits per character ``loss / ln 2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moglstm.lm.data import batchify, iter_windows, load_corpus
from moglstm.lm.data.sources import SPLITS
from moglstm.lm.dynamic_eval import DynamicEvalSettings, dynamic_evaluate, gradient_statistics
from moglstm.lm.errors import UserError
from moglstm.lm.metrics import metrics_for
from moglstm.lm.models import softmax_temperature
from moglstm.lm.progress import ScoreProgress
from moglstm.lm.regularize import scaled_dropout
from moglstm.lm.runs.folder import load_run, record_evaluation
from moglstm.lm.runtime import autocast, autocast_dtype, fix_cpu_threads
from moglstm.lm.state import detach_state

__all__ = [
    "OFFICIAL_TEMPERATURES",
    "TEMPERATURE_GRID",
    "evaluate",
    "evaluate_loss",
    "score_split",
    "search_temperature",
]

logger = logging.getLogger(__name__)

#: Temperatures tried by ``--temperature auto``: 0.75 to 1.25 in steps of 0.01 (1.0 included).
TEMPERATURE_GRID = tuple(round(0.75 + 0.01 * i, 2) for i in range(51))
#: The official code's candidates: logits multiplied by 1.06, 1.04, ..., 0.80, that is
#: divided by their inverses (0.943 to 1.25); ``train.eval_temperature_tokens`` uses them.
OFFICIAL_TEMPERATURES = tuple(1.0 / round(1.06 - 0.02 * i, 2) for i in range(14))


# --------------------------------------------------------------------------- metrics


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    data: Tensor,
    bptt: int,
    *,
    max_tokens: int | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: ScoreProgress | None = None,
) -> tuple[float, int]:
    """Mean cross-entropy of ``model`` over a batchified split, state carried across windows.

    The model is put in eval mode (and left there). Token losses are summed in
    float64, so the mean does not depend on how the split is cut into windows beyond
    the model's own arithmetic, and it is bit for bit :func:`score_split`'s at
    temperature 1.

    Args:
        model: a language model from :func:`~moglstm.lm.models.build_model`.
        data: ``(N, B)`` token ids from :func:`~moglstm.lm.data.batchify`, on the
            model's device.
        bptt: window length; clipped to a Transformer's ``max_len``.
        max_tokens: score only about this many target tokens (whole rows of ``B``);
            ``None`` scores the whole split.
        amp_dtype: run under ``torch.autocast`` with this dtype (see :func:`autocast_dtype`).
        progress: a bar to advance window by window.

    Returns:
        ``(mean loss in nats, number of tokens scored)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    bptt = min(bptt, getattr(model, "max_len", bptt))
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    count = 0
    state = None
    for inputs, targets in iter_windows(data, bptt, max_tokens=max_tokens):
        with autocast(data.device, amp_dtype):
            logits, state = model(inputs, state)  # logits: (T, B, V)
        state = detach_state(state)
        flat = logits.float().reshape(-1, logits.size(-1))
        # score_split's sum (float64, token by token): both give the same bits at T = 1
        window = _token_losses([flat], targets.reshape(-1), [1.0])[0]
        total += window
        count += targets.numel()
        if progress is not None:
            progress.update(targets.numel(), window)
    if count == 0:
        raise UserError(f"data: nothing to score in a split of shape {tuple(data.shape)}")
    return total.item() / count, count


@torch.no_grad()
def score_split(
    model: nn.Module,
    data: Tensor,
    bptt: int,
    *,
    temperatures: Sequence[float] = (1.0,),
    mc_samples: int = 0,
    mc_dropout_scale: float = 1.0,
    max_tokens: int | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: ScoreProgress | None = None,
) -> tuple[list[float], int]:
    r"""Mean cross-entropy of a split under several softmax temperatures at once.

    The logits are divided by each temperature ``T`` (``T < 1`` sharpens the
    distribution); every temperature costs one more softmax per window, not
    another pass of the model. A mixture of softmaxes divides each component's
    logits instead (:func:`~moglstm.lm.models.softmax_temperature`), one pass per
    temperature.

    With ``mc_samples = S > 0`` this is Monte-Carlo dropout evaluation: dropout
    stays on (every rate multiplied by ``mc_dropout_scale``), ``S`` copies of the
    model run side by side, each carrying its own state, and a token's probability
    is the mean of the ``S`` probabilities. Otherwise the model runs in eval mode.
    The model is left in eval mode.

    Args:
        model: a language model.
        data: ``(N, B)`` batchified token ids on the model's device.
        bptt: window length; clipped to a Transformer's ``max_len``.
        temperatures: the temperatures to score, each ``> 0``.
        mc_samples: dropout samples per token; 0 for deterministic scoring.
        mc_dropout_scale: multiplier on every dropout rate while sampling.
        max_tokens: score only about this many tokens; ``None`` for the whole split.
        amp_dtype: run under ``torch.autocast`` with this dtype.
        progress: a bar to advance window by window (it shows the first temperature's loss).

    Returns:
        ``(losses, tokens scored)``: one mean loss in nats per temperature.
    """
    temps = _check_temperatures(temperatures)
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
        raise UserError(f"mc_samples={mc_samples!r} must be an int >= 0")
    options = dict(mc_samples=mc_samples, mc_dropout_scale=mc_dropout_scale)
    options.update(max_tokens=max_tokens, amp_dtype=amp_dtype)
    if getattr(model, "returns_log_probs", False) and temps != [1.0]:
        # a mixture of softmaxes takes the temperature inside each component (as the
        # official code does): one pass of the model per temperature
        losses, count = [], 0
        for t in temps:
            with softmax_temperature(model, t):
                (loss,), count = score_split(model, data, bptt, **options)
            losses.append(loss)
        return losses, count
    bptt = min(bptt, getattr(model, "max_len", bptt))
    totals = torch.zeros(len(temps), dtype=torch.float64, device=data.device)
    count = 0
    samples = max(mc_samples, 1)
    states: list[Any] = [None] * samples
    context = scaled_dropout(model, mc_dropout_scale) if mc_samples else contextlib.nullcontext()
    with context:
        model.train(mc_samples > 0)  # dropout on only when sampling
        for inputs, targets in iter_windows(data, bptt, max_tokens=max_tokens):
            logits = []
            for i in range(samples):
                with autocast(data.device, amp_dtype):
                    out, state = model(inputs, states[i])  # out: (T, B, V)
                states[i] = detach_state(state)
                logits.append(out.float().reshape(-1, out.size(-1)))
            window = _token_losses(logits, targets.reshape(-1), temps)
            totals += window
            count += targets.numel()
            if progress is not None:
                progress.update(targets.numel(), window[0])
    model.eval()
    if count == 0:
        raise UserError(f"data: nothing to score in a split of shape {tuple(data.shape)}")
    return (totals / count).tolist(), count


def _check_temperatures(temperatures: Sequence[float]) -> list[float]:
    temps = list(temperatures)
    if not temps:
        raise UserError("temperatures: give at least one")
    for t in temps:
        bad = isinstance(t, bool) or not isinstance(t, (int, float))
        if bad or not (math.isfinite(t) and t > 0):
            raise UserError(f"temperature {t!r} must be a positive number")
    return [float(t) for t in temps]


def _token_losses(logits: list[Tensor], targets: Tensor, temps: list[float]) -> Tensor:
    """Summed loss per temperature; ``logits``: one ``(N, V)`` per sample, mixed in prob."""
    sums = []
    index = targets.unsqueeze(-1)  # (N, 1)
    for t in temps:
        # (S, N): log p_s(target) of each sample at temperature t
        logp = torch.stack([F.log_softmax(x / t, -1).gather(-1, index).squeeze(-1) for x in logits])
        mixed = torch.logsumexp(logp, 0) - math.log(len(logits))  # log of the mean probability
        sums.append(-mixed.double().sum())
    return torch.stack(sums)


def search_temperature(
    model: nn.Module,
    data: Tensor,
    bptt: int,
    *,
    max_tokens: int | None = 20000,
    candidates: Sequence[float] = TEMPERATURE_GRID,
    mc_samples: int = 0,
    mc_dropout_scale: float = 1.0,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, dict[float, float]]:
    r"""The softmax temperature that minimises the loss on the start of a split.

    The paper's protocol: search on the start of the validation split, then score
    validation and test with the temperature found. Since 1.0 is among the default
    candidates, the result is never worse than no temperature on the searched tokens.

    Args:
        model, data, bptt, mc_samples, mc_dropout_scale, amp_dtype: as in :func:`score_split`.
        max_tokens: tokens searched on (from the start); ``None`` for the whole split.
        candidates: temperatures to try.

    Returns:
        ``(best temperature, {temperature: mean loss})``.
    """
    losses, _ = score_split(
        model,
        data,
        bptt,
        temperatures=candidates,
        mc_samples=mc_samples,
        mc_dropout_scale=mc_dropout_scale,
        max_tokens=max_tokens,
        amp_dtype=amp_dtype,
    )
    table = dict(zip((float(c) for c in candidates), losses, strict=True))
    best = min(table, key=lambda t: (table[t], abs(t - 1.0)))  # ties: the one nearer 1
    return best, table


def evaluate(
    run: str | Path,
    split: str = "test",
    *,
    batch_size: int | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    bptt: int | None = None,
    max_tokens: int | None = None,
    data_dir: str | None = None,
    amp: bool = False,
    temperature: float | str | None = None,
    temperature_tokens: int | None = 20000,
    mc_samples: int = 0,
    mc_dropout_scale: float = 1.0,
    dynamic: DynamicEvalSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a trained run on a whole split (state carried across windows).

    Args:
        run: a run folder or a checkpoint file.
        split: ``"valid"``, ``"test"`` or ``"train"``.
        batch_size: number of parallel streams; ``None`` uses the run's
            ``data.eval_batch_size``. ``1`` is the paper's protocol (nothing unscored).
        checkpoint: ``"best"`` or ``"last"`` (for a run folder).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        bptt: window length; ``None`` uses the run's ``data.bptt``. It changes only
            speed and memory for recurrent models (the state is carried).
        max_tokens: score only the first ~``max_tokens`` tokens; ``None`` for all.
        data_dir: where the corpus is (overrides the run's ``data.data_dir``).
        amp: mixed precision on CUDA (see :func:`autocast_dtype`); off by default so
            reported numbers are full precision.
        temperature: divide the logits by this softmax temperature; ``"auto"``
            searches it (:func:`search_temperature`) on the first
            ``temperature_tokens`` tokens of the validation split, as the paper
            does, and applies it to ``split``; ``None`` means 1.
        temperature_tokens: how many validation tokens ``"auto"`` searches on
            (``None``: all).
        mc_samples: Monte-Carlo dropout: the mean of the probabilities over this
            many dropout samples (see :func:`score_split`); 0 scores without dropout.
        mc_dropout_scale: multiplier on every dropout rate while sampling.
        dynamic: score with dynamic evaluation (:mod:`moglstm.lm.dynamic_eval`)
            using these settings; the mean squared gradients are taken on the
            training split with the run's batch size and window length.
        progress: show a progress bar (on a terminal) with tokens/s and the running
            perplexity or bits per character.

    Returns:
        ``{"split", "loss", "ppl" or "bpc", "tokens", "tokens_dropped", "batch_size",
        "checkpoint", "step", "level", "temperature", "mc_samples", "dynamic"}``:
        ``tokens`` is the number scored and ``tokens_dropped`` the number batch size
        1 would score on top (``None`` with ``max_tokens``); ``temperature`` the one
        applied; ``dynamic`` the settings used (a dict) or ``None``. When the
        checkpoint is in a run folder the results are also appended to its
        ``evaluations.jsonl`` (shown by ``moglstm report``).
    """
    if split not in SPLITS:
        raise UserError(f"split={split!r} is not one of: {', '.join(SPLITS)}")
    for name, value in (
        ("batch_size", batch_size),
        ("bptt", bptt),
        ("max_tokens", max_tokens),
        ("temperature_tokens", temperature_tokens),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        if value is not None and value < 1:
            raise UserError(f"{name}={value} must be >= 1")
    _check_protocol(temperature, mc_samples, mc_dropout_scale, dynamic)
    fix_cpu_threads()  # the process's count, not adapted to the load (docs/reproducibility.md)
    loaded = load_run(run, checkpoint, device)
    cfg = loaded.config
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    corpus = load_corpus(cfg.data, vocab=loaded.vocab)
    ids = corpus.split(split)
    batch_size = cfg.data.eval_batch_size if batch_size is None else batch_size
    target = _model_device(loaded.model)
    data = batchify(ids, batch_size).to(target)
    amp_dtype = autocast_dtype(data.device, amp)
    bptt = bptt or cfg.data.bptt
    mc = {"mc_samples": mc_samples, "mc_dropout_scale": mc_dropout_scale, "amp_dtype": amp_dtype}
    if temperature == "auto":
        valid = batchify(corpus.valid, batch_size).to(target)
        temperature, _ = search_temperature(
            loaded.model, valid, bptt, max_tokens=temperature_tokens, **mc
        )
        logger.info("temperature %.2f (searched on the start of the validation split)", temperature)
    temperature = 1.0 if temperature is None else float(temperature)
    bar = ScoreProgress(
        data,
        corpus.level,
        f"{'dynamic ' if dynamic is not None else ''}{split}",
        enabled=progress,
        max_tokens=max_tokens,
    )
    with bar:
        if dynamic is not None:
            train = batchify(corpus.train, cfg.data.batch_size).to(target)
            windows = dynamic.grad_batches
            with ScoreProgress(
                train,
                corpus.level,
                "dynamic: gradient RMS on train",
                enabled=progress,
                max_tokens=None if windows is None else windows * cfg.data.bptt * train.size(1),
            ) as stats_bar:
                ms = gradient_statistics(
                    loaded.model,
                    train,
                    cfg.data.bptt,
                    max_batches=dynamic.grad_batches,
                    progress=stats_bar,
                )
            loss, scored = dynamic_evaluate(
                loaded.model,
                data,
                ms,
                dynamic,
                temperature=temperature,
                max_tokens=max_tokens,
                progress=bar,
            )
        elif mc_samples or temperature != 1.0:
            (loss,), scored = score_split(
                loaded.model,
                data,
                bptt,
                temperatures=[temperature],
                max_tokens=max_tokens,
                progress=bar,
                **mc,
            )
        else:
            loss, scored = evaluate_loss(
                loaded.model, data, bptt, max_tokens=max_tokens, amp_dtype=amp_dtype, progress=bar
            )
    # relative to batch size 1, which scores every token but the first
    dropped = ids.numel() - 1 - scored if max_tokens is None else None
    if dropped:
        logger.info(
            "%d of %d %s tokens not scored with batch size %d (use --batch-size 1 to score all)",
            dropped,
            ids.numel(),
            split,
            batch_size,
        )
    results = {
        "split": split,
        **metrics_for(loss, corpus.level),
        "tokens": scored,
        "tokens_dropped": dropped,
        "batch_size": batch_size,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "level": corpus.level,
        "temperature": temperature,
        "mc_samples": mc_samples,
        "dynamic": None if dynamic is None else dataclasses.asdict(dynamic),
    }
    if (loaded.checkpoint.parent / "metrics.jsonl").is_file():  # a run folder: keep a record
        record_evaluation(loaded.checkpoint.parent, results)
    return results


def _check_protocol(temperature: Any, mc_samples: Any, mc_dropout_scale: Any, dynamic: Any) -> None:
    """Argument checks of :func:`evaluate`'s protocol options."""
    if isinstance(temperature, str):
        if temperature != "auto":
            raise UserError(f"temperature={temperature!r}: give a number > 0 or 'auto'")
    elif temperature is not None:
        _check_temperatures([temperature])
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
        raise UserError(f"mc_samples={mc_samples!r} must be an int >= 0")
    if isinstance(mc_dropout_scale, bool) or not isinstance(mc_dropout_scale, (int, float)):
        raise TypeError(f"mc_dropout_scale: expected a number, got {mc_dropout_scale!r}")
    if not (math.isfinite(mc_dropout_scale) and mc_dropout_scale >= 0):
        raise UserError(f"mc_dropout_scale={mc_dropout_scale!r} must be >= 0")
    if dynamic is not None and not isinstance(dynamic, DynamicEvalSettings):
        raise TypeError(f"dynamic: expected DynamicEvalSettings or None, got {dynamic!r}")
    if dynamic is not None and mc_samples:
        raise UserError(
            f"dynamic evaluation and mc_samples={mc_samples} cannot be combined: dynamic "
            "evaluation scores without dropout"
        )


def _model_device(model: nn.Module) -> torch.device:
    first: Iterator[Tensor] = iter(model.parameters())
    return next(first).device
