"""From a :class:`~moglstm.lm.config.ModelConfig` to a model: :func:`build_model`.

The config is handed on whole: the recurrent models take the model section, the
Transformer its ``transformer`` settings. A parameter budget (``num_params``) is solved
here by building candidate models on the ``meta`` device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from moglstm.lm.budget import MAX_SEARCHED_SIZE, largest_fitting, parse_count
from moglstm.lm.errors import UserError
from moglstm.lm.models.checks import check_int
from moglstm.lm.models.recurrent import RNNLanguageModel, _embedding_size
from moglstm.lm.models.transformer import TransformerLanguageModel

if TYPE_CHECKING:
    from moglstm.lm.config import ModelConfig

__all__ = [
    "build_model",
    "build_on_meta",
    "count_parameters",
    "parameter_count",
    "resolve_sizes",
]

logger = logging.getLogger("moglstm.lm.models")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    r"""Number of scalar parameters in ``model``, counting shared (tied) tensors once.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"count_parameters: model must be an nn.Module, got {type(model).__name__}")
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    r"""Build the language model that ``cfg`` describes.

    Args:
        cfg: model configuration; ``cfg.kind`` picks the class: ``"transformer"`` gives a
            :class:`TransformerLanguageModel`, the recurrent kinds an :class:`RNNLanguageModel`
            whose sizes come from :func:`resolve_sizes` (``cfg.num_params`` and
            ``cfg.embedding_ratio``, when set, override ``hidden_size`` and ``embedding_size``).
        vocab_size: number of token types.

    Returns:
        The model, on the default device (the CPU unless a ``torch.device`` context
        says otherwise), in training mode.
    """
    from moglstm.lm.config import ModelConfig, check_model  # the config imports this package

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    check_int("vocab_size", vocab_size)
    check_model(cfg)
    if cfg.kind == "transformer":
        return TransformerLanguageModel(vocab_size, cfg.transformer)
    hidden_size, embedding_size = resolve_sizes(cfg, vocab_size)
    return RNNLanguageModel(vocab_size, _sized(cfg, hidden_size, embedding_size))


def _sized(cfg: ModelConfig, hidden_size: int, embedding_size: int | None) -> ModelConfig:
    """``cfg`` with its sizes solved: no budget, no ratio left to apply."""
    return dataclasses.replace(
        cfg,
        hidden_size=hidden_size,
        embedding_size=embedding_size,
        num_params=None,
        embedding_ratio=None,
    )


def resolve_sizes(cfg: ModelConfig, vocab_size: int) -> tuple[int, int | None]:
    r"""The ``(hidden_size, embedding_size)`` a recurrent model of ``cfg`` is built with.

    ``cfg.embedding_ratio`` sets the embedding size from the hidden size; with
    ``cfg.num_params`` the hidden size is the largest whose model (with every
    other setting of ``cfg``) has at most that many parameters, found by binary
    search over models built on the ``meta`` device (nothing is allocated), so the
    count is exact. ``embedding_size`` ``None`` means "the hidden size".

    Args:
        cfg: a recurrent model's configuration.
        vocab_size: number of token types.

    Raises:
        ValueError: the budget is too small for any hidden size.
    """
    check_int("vocab_size", vocab_size)
    if cfg.num_params is None:
        return cfg.hidden_size, _embedding_size(cfg, cfg.hidden_size)
    budget = parse_count(cfg.num_params)
    if _is_largest_fitting(cfg, vocab_size, cfg.hidden_size, budget):
        # a run's config records the size solved for its budget (see with_resolved_sizes):
        # two counts confirm it instead of a search, and nothing is announced again
        return cfg.hidden_size, _embedding_size(cfg, cfg.hidden_size)
    try:
        hidden = largest_fitting(lambda h: _count_on_meta(cfg, vocab_size, h), budget)
    except ValueError as exc:
        raise UserError(f"model.num_params={cfg.num_params!r}: {exc}") from exc
    if hidden == MAX_SEARCHED_SIZE:  # the budget allows more than any size searched
        most = _count_on_meta(cfg, vocab_size, hidden)
        raise UserError(
            f"model.num_params={cfg.num_params!r} is more than the largest model considered "
            f"(hidden size {hidden:,}: {most:,} parameters); give a smaller budget"
        )
    message = f"model.num_params={cfg.num_params}: hidden size {hidden}"
    if message not in _ANNOUNCED:  # once per process, however often a model is rebuilt
        _ANNOUNCED.add(message)
        logger.info("%s", message)
    return hidden, _embedding_size(cfg, hidden)


_ANNOUNCED: set[str] = set()


def _is_largest_fitting(cfg: ModelConfig, vocab_size: int, hidden: int, budget: int) -> bool:
    if not 1 <= hidden < MAX_SEARCHED_SIZE:
        return False
    fits = _count_on_meta(cfg, vocab_size, hidden)
    next_one = _count_on_meta(cfg, vocab_size, hidden + 1)
    return fits is not None and fits <= budget and next_one is not None and next_one > budget


def with_resolved_sizes(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """``cfg`` with ``hidden_size`` set to the size its ``num_params`` budget solves, the
    budget kept: what a run's ``config.yaml`` records, so it says what was built (and
    rebuilding it needs no search). An ``embedding_ratio`` stays the embedding's size
    (``round(ratio * hidden_size)``): the config takes a ratio or a size, not both."""
    if cfg.kind == "transformer" or cfg.num_params is None:
        return cfg
    hidden, _ = resolve_sizes(cfg, vocab_size)
    return dataclasses.replace(cfg, hidden_size=hidden)


def _count_on_meta(cfg: ModelConfig, vocab_size: int, hidden_size: int) -> int | None:
    """Parameters of the model with this hidden size; ``None`` if it cannot be built."""
    embedding = _embedding_size(cfg, hidden_size) or hidden_size
    rank = cfg.mogrifier.rank if cfg.kind == "mogrifier" and cfg.mogrifier.rounds else None
    if rank is not None and not rank < min(hidden_size, embedding):
        return None  # a mogrifier rank must be below both sizes it connects
    # trainable only: init="official" freezes bias_hh (the official cell has one bias)
    return parameter_count(_sized(cfg, hidden_size, embedding), vocab_size, trainable_only=True)


def parameter_count(cfg: ModelConfig, vocab_size: int, trainable_only: bool = False) -> int:
    """:func:`count_parameters` of :func:`build_model`'s model, in bounded time and memory.

    The count is affine in each depth-like number of the config, so it is computed
    from at most eight models built on the ``meta`` device with those numbers set to 1
    to 4, however large they are (``model.num_layers``, ``model.mogrifier.rounds``,
    ``model.transformer.depth``, ``model.transformer.max_len``):

    * recurrent: the first layer reads the embedding and every other one the hidden
      state, so the count is ``P(1) + (L - 1) (P(2) - P(1))`` in the layers ``L``;
      per layer, each pair of mogrifier rounds adds the same two matrices (``Q``
      then ``R``), so from 3 or 4 rounds on (by parity) it grows by a constant per pair;
    * Transformer: identical blocks (affine in ``depth``) and, with learned positions,
      one row per position (affine in ``max_len``).

    Args:
        cfg: the model section (a ``num_params`` budget is solved first).
        vocab_size: number of token types.
        trainable_only: count only parameters with ``requires_grad``.
    """
    if cfg.kind != "transformer" and (cfg.num_params is not None or cfg.embedding_ratio):
        cfg = _sized(cfg, *resolve_sizes(cfg, vocab_size))
    count = functools.partial(_count_small, vocab_size=vocab_size, trainable_only=trainable_only)
    if cfg.kind == "transformer":
        t = cfg.transformer
        base = count(cfg, depth=1, max_len=1)
        per_block = count(cfg, depth=2, max_len=1) - base
        per_position = count(cfg, depth=1, max_len=2) - base
        return base + (t.depth - 1) * per_block + (t.max_len - 1) * per_position
    rounds = cfg.mogrifier.rounds if cfg.kind == "mogrifier" else 0

    def with_rounds(r: int) -> int:  # exact for cfg.num_layers and r rounds
        one = count(cfg, num_layers=1, rounds=r)
        if cfg.num_layers == 1:
            return one
        return one + (cfg.num_layers - 1) * (count(cfg, num_layers=2, rounds=r) - one)

    if rounds <= 4:
        return with_rounds(rounds)
    top = 4 - rounds % 2  # 3 or 4: the same parity as `rounds`, with a pair below it
    high = with_rounds(top)
    return high + (rounds - top) // 2 * (high - with_rounds(top - 2))


def _count_small(cfg: ModelConfig, *, vocab_size: int, trainable_only: bool, **small: int) -> int:
    """Parameters of ``cfg``'s model with the depth-like numbers in ``small`` (all <= 4)."""
    if cfg.kind == "transformer":
        cfg = dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, **small))
    else:
        rounds = small.pop("rounds")
        if cfg.kind == "mogrifier":
            cfg = dataclasses.replace(
                cfg, mogrifier=dataclasses.replace(cfg.mogrifier, rounds=rounds)
            )
        cfg = dataclasses.replace(cfg, **small)
    with torch.device("meta"), _SkipMetaInPlace():
        return count_parameters(build_model(cfg, vocab_size), trainable_only=trainable_only)


def build_on_meta(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """:func:`build_model` on the ``meta`` device: every parameter's shape, no memory.

    For checks before the real model is built: its parameter count, the shapes a
    checkpoint's weights must have.
    """
    with torch.device("meta"), _SkipMetaInPlace():
        return build_model(cfg, vocab_size)


class _SkipMetaInPlace(TorchFunctionMode):
    """Skip in-place ops (``normal_``, ``uniform_``, ...) on meta tensors.

    Initialising meta tensors computes nothing, yet their Python decompositions
    cost milliseconds each; skipping them makes counting a model on the meta device
    about 20 times faster (the budget search builds ~30 models).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        # torch.nn.init passes the tensor by keyword (``tensor=``)
        first = args[0] if args else (kwargs or {}).get("tensor")
        if name.endswith("_") and not name.startswith("_") and _is_meta(first):
            return first
        return func(*args, **(kwargs or {}))


def _is_meta(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_meta
