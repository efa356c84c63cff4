"""What a training checkpoint holds: one typed payload, its keys described once, and
the checks of a loaded payload against its own config.

The training loop builds a :class:`CheckpointPayload`; the checkpoint module's
documentation is generated from :data:`PAYLOAD_KEYS`, so it cannot drift from it.
:func:`check_training_checkpoint` checks the parts of a loaded payload against each
other before anything is built from them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypedDict

import torch

from moglstm.lm.errors import CheckpointError, UserError
from moglstm.lm.safety import check_tree_size, short_repr

__all__ = [
    "MODEL_ENTRIES",
    "PAYLOAD_KEYS",
    "TRAINING_ENTRIES",
    "CheckpointPayload",
    "check_training_checkpoint",
    "describe_payload",
]


class CheckpointPayload(TypedDict, total=False):
    """A training checkpoint's content: tensors and plain data only (see PAYLOAD_KEYS)."""

    format_version: int
    model: dict[str, Any]
    train_model: dict[str, Any]
    averaging: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    config: dict[str, Any]
    counters: dict[str, Any]
    data: dict[str, Any]
    rng: dict[str, Any]
    rng_per_rank: list[Any]
    vocab: dict[str, Any]
    train_state: Any


#: Every key of :class:`CheckpointPayload`, with what it holds (in file order).
PAYLOAD_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "format_version": "int, added by save_checkpoint (FORMAT_VERSION)",
        "model": "the weights validation scored: model.state_dict() (the average, once "
        "weight averaging started)",
        "train_model": "while averaging: the trained weights' state_dict()",
        "averaging": "while averaging: {'count': int}",
        "optimizer": "optimizer.state_dict()",
        "scheduler": "the learning-rate schedule's state_dict() (lr, best, bad, since_decay)",
        "scaler": "torch.amp.GradScaler state_dict() (float16 autocast) or None",
        "config": "moglstm.lm.config.to_dict(cfg), with its version",
        "counters": "{'step': int, 'epoch': int, 'lr': float, 'best_valid_loss': float, "
        "'bad_validations': int, ...}",
        "data": "the training batch stream's state_dict() (position, epoch, generator)",
        "rng": "moglstm.lm.runtime.capture_rng_state() (rank 0's)",
        "rng_per_rank": "under torchrun: every rank's capture_rng_state()",
        "vocab": "Vocab.to_dict()",
        "train_state": "the detached carried state of the global batch (None: none)",
    }
)

#: Entries every checkpoint has, and those a checkpoint to resume from needs too.
MODEL_ENTRIES = ("model", "config", "vocab")
TRAINING_ENTRIES = (*MODEL_ENTRIES, "optimizer", "scheduler", "counters", "data", "rng")


def describe_payload(indent: str = "    ") -> str:
    """:data:`PAYLOAD_KEYS` as an aligned text table (for docstrings and help)."""
    width = max(map(len, PAYLOAD_KEYS)) + 2
    return "\n".join(f"{indent}{key:<{width}}{text}" for key, text in PAYLOAD_KEYS.items())


# --------------------------------------------------------------------------- consistency

_MAX_PLAIN_VALUES = 1_000_000  # plain values outside the vocabulary (a payload has ~1000)
_SHOWN = 3  # names listed in an error, at most


def check_training_checkpoint(
    payload: Mapping[str, Any], path: Path, *, resume: bool = False
) -> Any:
    """Check a loaded checkpoint against its own config before anything is built from it.

    The checks, in order, each cheap and none allocating the model:

    * the entries a model needs (and with ``resume`` those training needs) are there,
      and no entry is plain data of more than a million values (shared references
      counted each time), so a small crafted file cannot expand into a huge config;
    * the config is valid (:func:`~moglstm.lm.config.validate`), the vocabulary is a
      list of distinct strings;
    * the model the config describes is built on the ``meta`` device (no memory)
      and every weight (``model`` and ``train_model``) has its name and shape, with
      finite values;
    * with ``resume``: the counters are numbers, and the optimizer's groups and
      moments match the model's parameters.

    Args:
        payload: from :func:`load_checkpoint`.
        path: the file it came from (named in errors).
        resume: also check what resuming training needs.

    Returns:
        The validated :class:`~moglstm.lm.config.RunConfig`.

    Raises:
        CheckpointError: one line naming the file and the first inconsistency.
    """
    where = f"checkpoint {str(path)!r}"
    needed = TRAINING_ENTRIES if resume else MODEL_ENTRIES
    missing = [k for k in needed if k not in payload]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: not a training checkpoint")
    try:
        for key, value in payload.items():
            if key not in ("vocab", "config"):
                check_tree_size(value, f"its {short_repr(key)}", max_values=_MAX_PLAIN_VALUES)
        check_tree_size(payload["config"], "its config")
        cfg = _checked_config(payload["config"])
        vocab_size = _checked_vocab(payload["vocab"])
        _check_depth(cfg, payload["model"])  # before building: bounded by the file's tensors
        model = _meta_model(cfg, vocab_size)
        for key in ("model", "train_model"):
            if key in payload:
                _check_weights(payload[key], model, key, cfg)
        if resume:
            _check_counters(payload["counters"])
            _check_data_position(payload["data"])
            _check_train_state(payload.get("train_state"), model, cfg)
            _check_optimizer(payload["optimizer"], model, cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg


def _checked_config(config: Any) -> Any:
    from moglstm.lm.config import from_dict, validate

    try:
        return validate(from_dict(config))
    except (TypeError, ValueError) as exc:
        lines = str(exc).splitlines()
        shown = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[1].strip()}"
        raise UserError(f"its config is not valid ({shown})") from None


def _checked_vocab(vocab: Any) -> int:
    from moglstm.lm.data import Vocab

    if not isinstance(vocab, Mapping) or not isinstance(vocab.get("tokens"), (list, tuple)):
        raise UserError("its vocab is not a mapping with a list of tokens")
    check_tree_size({k: v for k, v in vocab.items() if k != "tokens"}, "its vocab", max_values=100)
    if not all(isinstance(t, str) for t in vocab["tokens"]):
        raise UserError("its vocab holds tokens that are not strings")
    try:
        return len(Vocab.from_dict(vocab))
    except (TypeError, ValueError) as exc:
        raise UserError(f"its vocab is malformed ({short_repr(str(exc), 160)[1:-1]})") from None


def _meta_model(cfg: Any, vocab_size: int) -> torch.nn.Module:
    from moglstm.lm.models import build_on_meta

    try:
        return build_on_meta(cfg.model, vocab_size)
    except (RuntimeError, ValueError, OverflowError) as exc:
        raise UserError(
            f"its config describes a model that cannot be built ({short_repr(str(exc), 160)})"
        ) from None


def _check_weights(state: Any, model: torch.nn.Module, key: str, cfg: Any) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"its {key!r} entry is not a mapping of weights")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        parts = [f"lacks {_names(missing)}"] if missing else []
        parts += [f"has extra {_names(extra)}"] if extra else []
        raise UserError(
            f"its {key!r} weights do not fit its config ({_model_summary(cfg)}): "
            + " and ".join(parts)
        )
    for name, want in expected.items():
        have = state[name]
        if not isinstance(have, torch.Tensor):
            raise TypeError(f"its weight {key}[{name!r}] is a {type(have).__name__}, not a tensor")
        if have.shape != want.shape:
            raise UserError(
                f"its weight {key}[{name!r}] has shape {tuple(have.shape)} but its config "
                f"({_model_summary(cfg)}) gives {tuple(want.shape)}"
            )
        _check_finite(have, f"its weight {key}[{name!r}]")


def _check_finite(t: torch.Tensor, label: str) -> None:
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise UserError(f"{label} holds NaN or infinite values")


def _check_counters(counters: Any) -> None:
    if not isinstance(counters, Mapping):
        raise TypeError("its counters are not a mapping")
    for name in ("step", "epoch", "tokens"):
        value = counters.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"its counters have {name}={short_repr(value)}: expected an int >= 0")
    for name, value in counters.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"its counter {short_repr(name)} is {short_repr(value)}, not a number")
        if isinstance(value, float) and math.isnan(value):
            raise UserError(f"its counter {short_repr(name)} is NaN")
    elapsed, lr = counters.get("elapsed", 0.0), counters.get("lr", 1.0)
    if elapsed is not None and not 0 <= elapsed < math.inf:
        raise UserError(f"its counters have elapsed={short_repr(elapsed)}: expected seconds >= 0")
    if lr is not None and not 0 < lr < math.inf:
        raise UserError(f"its counters have lr={short_repr(lr)}: expected a finite rate > 0")


def _check_data_position(data: Any) -> None:
    """The batch stream's place: the corpus-dependent bound is checked when it is restored."""
    if not isinstance(data, Mapping):
        raise TypeError("its data entry is not a mapping")
    for name in ("position", "epoch"):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"its data {name} is {short_repr(value)}: expected an int >= 0")
    generator = data.get("generator")
    if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
        raise TypeError("its data generator state is not a byte tensor")


def _check_train_state(state: Any, model: torch.nn.Module, cfg: Any) -> None:
    """The carried state: per layer ``(h, c)`` (mogrifier/lstm) or ``h``, each
    ``(1, data.batch_size, hidden_size)`` and finite; ``None`` (zeros) is always fine."""
    if state is None:
        return
    hidden = getattr(model, "hidden_size", None)
    if hidden is None:
        raise UserError("its carried state is not None, but a Transformer keeps no state")
    layers, pair = cfg.model.num_layers, cfg.model.kind in ("mogrifier", "lstm")
    if not isinstance(state, (list, tuple)) or len(state) != layers:
        raise UserError(f"its carried state is not a list of {layers} layers' states")
    want = (1, cfg.data.batch_size, hidden)
    for i, entry in enumerate(state):
        parts = entry if pair and isinstance(entry, (list, tuple)) else (entry,)
        if len(parts) != (2 if pair else 1):
            raise UserError(f"its carried state of layer {i} is not {'(h, c)' if pair else 'h'}")
        for t in parts:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise UserError(
                    f"its carried state of layer {i} has shape {shape}, but its config gives "
                    f"{want} (1, data.batch_size, hidden size)"
                )
            _check_finite(t, f"its carried state of layer {i}")


def _check_depth(cfg: Any, weights: Any) -> None:
    """Refuse a config with more layers (or rounds, or blocks) than the weights hold
    tensors, before a model of that depth is built on the meta device."""
    m = cfg.model
    if m.kind == "transformer":
        depth, what = m.transformer.depth, f"model.transformer.depth={m.transformer.depth}"
    else:
        rounds = m.mogrifier.rounds if m.kind == "mogrifier" else 0
        depth, what = m.num_layers * max(1, rounds), f"model.num_layers={m.num_layers}"
        if rounds:
            what += f" with model.mogrifier.rounds={rounds}"
    held = len(weights) if isinstance(weights, Mapping) else 0
    if depth > held:
        raise UserError(
            f"its config ({what}) needs more weight tensors than the {held} its model entry holds"
        )


def _check_optimizer(state: Any, model: torch.nn.Module, cfg: Any) -> None:
    from moglstm.lm.policies import make_optimizer

    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list):
        raise TypeError("its optimizer entry is not an optimizer state")
    fresh = make_optimizer(model, cfg.train)  # on the meta parameters: allocates nothing
    params = [p for group in fresh.param_groups for p in group["params"]]
    sizes = [len(g["params"]) for g in fresh.param_groups]
    saved = state["param_groups"]
    if [len(g.get("params", ())) if isinstance(g, Mapping) else None for g in saved] != sizes:
        raise UserError(
            f"its optimizer state has groups of {short_repr([_count(g) for g in saved])} "
            f"parameters but its config's model has {sizes}"
        )
    moments = state.get("state", {})
    if not isinstance(moments, Mapping):
        raise TypeError("its optimizer's state is not a mapping")
    for index, entry in moments.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise UserError(
                f"its optimizer state names parameter {short_repr(index)}, not one of its model's"
            )
        for name, value in entry.items() if isinstance(entry, Mapping) else ():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != params[index].shape:
                    raise UserError(
                        f"its optimizer's {short_repr(name)} of parameter {index} has shape "
                        f"{tuple(value.shape)}, but the parameter has {tuple(params[index].shape)}"
                    )
                _check_finite(value, f"its optimizer's {short_repr(name)} of parameter {index}")


def _count(group: Any) -> Any:
    return len(group["params"]) if isinstance(group, Mapping) and "params" in group else "?"


def _names(names: list) -> str:
    shown = ", ".join(short_repr(n, 60) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _model_summary(cfg: Any) -> str:
    m = cfg.model
    if m.kind == "transformer":
        t = m.transformer
        return (
            f"model.kind='transformer', model.transformer.d_model={t.d_model}, "
            f"model.transformer.depth={t.depth}"
        )
    return (
        f"model.kind={m.kind!r}, model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}"
    )
