"""One set of checks for a whole config, run once before any data is loaded.

:func:`validate` reports every problem at once, one per line, each naming the dotted
key and its value; :func:`model_problems` is the model section's part, which the model
classes run on the config they are handed (so a model built without a run config is
checked by the same rules). The choice lists come from the modules that use them.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Union

from moglstm.lm.config.plain import _SCALAR_COERCERS, _type_name, hints
from moglstm.lm.config.ranges import range_problems
from moglstm.lm.config.schema import (
    CONFIG_VERSION,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from moglstm.lm.data.sources import CORPORA, LEVELS
from moglstm.lm.errors import ConfigError, ConfigTypeError
from moglstm.lm.layers import DROPOUT_MASKS
from moglstm.lm.models.kinds import (
    INITS,
    MODEL_KINDS,
    POSITIONAL_KINDS,
    RECURRENT_KINDS,
)
from moglstm.lm.policies import NONFINITE_POLICIES, SCHEDULES
from moglstm.lm.runtime import DEVICE_HELP, is_device_spec
from moglstm.lm.safety import short_repr
from moglstm.nn.backends import IMPLEMENTATIONS

__all__ = ["check_model", "model_problems", "validate"]


def validate(cfg: RunConfig) -> RunConfig:
    """Check types, choices, ranges and cross-field rules of ``cfg``.

    Every problem found is reported at once, one per line, in a single
    :class:`~moglstm.lm.errors.ConfigError` (a ``ValueError``; a
    :class:`~moglstm.lm.errors.ConfigTypeError`, also a ``TypeError``, when values
    have the wrong type); each names the dotted key and the offending value (choice
    errors also list the valid choices).

    Args:
        cfg: the config to check.

    Returns:
        ``cfg`` itself, so calls can be chained.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {type(cfg).__name__}")
    problems = _type_problems(cfg)
    if problems:  # range checks assume the types are right
        raise ConfigTypeError("invalid config:\n  " + "\n  ".join(problems))
    problems = _check_run(cfg) + _check_data(cfg.data) + model_problems(cfg.model, cfg.data)
    problems += _check_train(cfg.train) + _check_accumulation(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def _type_problems(cfg: RunConfig) -> list[str]:
    problems = _section_type_problems(cfg, "")
    if problems:  # a section that is not its dataclass cannot be inspected further
        return problems
    for name in ("data", "model", "train"):
        problems += _section_type_problems(getattr(cfg, name), f"{name}.")
    return problems or _model_type_problems(cfg.model, "model.")


def _model_type_problems(m: ModelConfig, prefix: str) -> list[str]:
    return [
        p
        for name in ("mogrifier", "output", "transformer")
        for p in _section_type_problems(getattr(m, name), f"{prefix}{name}.")
    ]


def _section_type_problems(section: Any, prefix: str) -> list[str]:
    problems = []
    for name, tp in hints(type(section)).items():
        value = getattr(section, name)
        if not _matches(value, tp):
            problems.append(f"{prefix}{name}: expected {_describe(tp)}, got {short_repr(value)}")
    return problems


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` already has field type ``tp`` (ints count as floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return (
            isinstance(value, (tuple, list))
            and len(value) == len(args)
            and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        )
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if tp is float else tp)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    if tp is type(None):
        return "None"
    return _type_name(tp) if tp in _SCALAR_COERCERS else f"a {tp.__name__}"


def _choice(key: str, value: str, choices: Sequence[str]) -> list[str]:
    if value in choices:
        return []
    return [f"{key}={short_repr(value)} is not one of: {', '.join(choices)}"]


def _positive(section: Any, prefix: str, names: Sequence[str], optional: bool = False) -> list[str]:
    problems = []
    for name in names:
        value = getattr(section, name)
        if optional and value is None:
            continue
        if value <= 0:
            problems.append(f"{prefix}{name}={value!r} must be positive")
    return problems


def _at_least_zero(section: Any, prefix: str, names: Sequence[str]) -> list[str]:
    return [
        f"{prefix}{n}={getattr(section, n)!r} must be >= 0"
        for n in names
        if getattr(section, n) < 0
    ]


def _check_run(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.version != CONFIG_VERSION:
        problems.append(f"version={cfg.version!r} must be {CONFIG_VERSION} (the current schema)")
    if not cfg.name or "/" in cfg.name or "\\" in cfg.name or cfg.name in (".", ".."):
        problems.append(f"name={cfg.name!r} must be a non-empty folder name without '/' or '\\'")
    if not cfg.out_dir:
        problems.append("out_dir='' must name a folder")
    return problems


def _check_data(data: DataConfig) -> list[str]:
    problems = _choice("data.corpus", data.corpus, CORPORA) + _choice(
        "data.level", data.level, LEVELS
    )
    problems += _positive(data, "data.", ["batch_size", "bptt", "eval_batch_size"])
    split_paths = [data.train_path, data.valid_path, data.test_path]
    if data.corpus == "text":
        if data.path is None and None in split_paths:
            problems.append(
                "data.corpus='text' needs data.path (a folder with train.txt, valid.txt and "
                "test.txt) or all three of data.train_path, data.valid_path, data.test_path"
            )
        elif data.path is not None and any(p is not None for p in split_paths):
            problems.append(
                f"data.path={data.path!r} and data.train_path/valid_path/test_path are "
                "alternatives: give one or the other"
            )
    else:
        for name in ("path", "train_path", "valid_path", "test_path"):
            if getattr(data, name) is not None:
                problems.append(
                    f"data.{name}={getattr(data, name)!r} is only used with data.corpus='text' "
                    f"(corpus is {data.corpus!r})"
                )
    return problems


_MOGRIFIER_ONLY = ("coupled", "peephole", "cap_input_gate")
_FORGET_GATE_KINDS = ("mogrifier", "lstm")
# fields whose other values need a recurrent model kind: their defaults
_RECURRENT_ONLY = {
    "drop_state_probability": 0.0,
    "embedding_ratio": None,
    "num_params": None,
    "state_dropout_mask": None,
    "init": "default",
}


def check_model(m: ModelConfig) -> ModelConfig:
    """Raise :class:`~moglstm.lm.errors.ConfigError` listing every problem of ``m``
    (a :class:`~moglstm.lm.errors.ConfigTypeError` when values have the wrong type).

    The check the model classes run on the config they are given; returns ``m``.
    """
    if not isinstance(m, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig, got {type(m).__name__}")
    typed = _section_type_problems(m, "model.") or _model_type_problems(m, "model.")
    if typed:
        raise ConfigTypeError("invalid model config:\n  " + "\n  ".join(typed))
    problems = model_problems(m)
    if problems:
        raise ConfigError("invalid model config:\n  " + "\n  ".join(problems))
    return m


def model_problems(m: ModelConfig, data: DataConfig | None = None) -> list[str]:
    """Every problem of the model section ``m``, one message each (empty: none).

    Args:
        m: the model section.
        data: the data section, for the rules that involve both (the Transformer's
            window length); ``None`` skips them.
    """
    if not isinstance(m, ModelConfig):
        raise TypeError(f"model config: expected a ModelConfig, got {type(m).__name__}")
    problems = _section_type_problems(m, "model.") or _model_type_problems(m, "model.")
    if problems:
        return problems
    problems = _choice("model.kind", m.kind, MODEL_KINDS)
    problems += _positive(m, "model.", ["hidden_size", "num_layers"])
    problems += _positive(m, "model.", ["embedding_size"], optional=True)
    problems += range_problems(m, "model.")  # every float: config/ranges.py
    problems += _check_mogrifier(m) + _check_output(m) + _check_recipe(m)
    return problems + _check_transformer(m, data)


def _check_mogrifier(m: ModelConfig) -> list[str]:
    g, prefix = m.mogrifier, "model.mogrifier."
    problems = _choice(f"{prefix}implementation", g.implementation, IMPLEMENTATIONS)
    problems += _at_least_zero(g, prefix, ["rounds"])
    problems += _positive(g, prefix, ["rank"], optional=True)
    if m.kind != "mogrifier":
        if m.state_dropout > 0:
            problems.append(
                f"model.state_dropout={m.state_dropout!r} needs model.kind='mogrifier' "
                f"(kind is {m.kind!r})"
            )
        problems += [
            f"{prefix}{name}=True needs model.kind='mogrifier' (kind is {m.kind!r})"
            for name in _MOGRIFIER_ONLY
            if getattr(g, name)
        ]
    return problems + _check_rank(m)


def _check_rank(m: ModelConfig) -> list[str]:
    """A low rank must be below both sizes the mogrifier matrices connect (when known:
    with model.num_params the hidden size is solved later, skipping ranks that do not fit)."""
    rank = m.mogrifier.rank
    if m.kind != "mogrifier" or not m.mogrifier.rounds or rank is None:
        return []
    if m.num_params is not None or rank <= 0:
        return []
    if m.embedding_ratio is not None:
        embedding, what = max(1, round(m.embedding_ratio * m.hidden_size)), "embedding_ratio"
    else:
        embedding, what = m.embedding_size or m.hidden_size, "embedding_size"
    limit = min(m.hidden_size, embedding)
    if rank < limit:
        return []
    return [
        f"model.mogrifier.rank={rank} must be below model.hidden_size={m.hidden_size} "
        f"and the embedding size ({embedding}, from model.{what}): a rank of {limit} or more "
        "is no cheaper than full matrices (model.mogrifier.rank=null)"
    ]


def _check_output(m: ModelConfig) -> list[str]:
    o, prefix = m.output, "model.output."
    problems = _positive(o, prefix, ["mos_components"]) + range_problems(o, prefix)
    if m.kind == "transformer":  # the Transformer's softmax is always tied, plain
        defaults = type(o)()
        problems += [
            f"{prefix}{name}={getattr(o, name)!r} needs a recurrent model.kind (kind is "
            "'transformer')"
            for name in hints(type(o))
            if name != "tie_weights" and getattr(o, name) != getattr(defaults, name)
        ]
        return problems
    if o.mos_dropout > 0 and o.mos_components == 1:
        problems.append(f"{prefix}mos_dropout={o.mos_dropout!r} needs {prefix}mos_components > 1")
    if o.projection_dropout > 0 and (o.mos_components > 1 or not o.tie_weights):
        problems.append(
            f"{prefix}projection_dropout={o.projection_dropout!r} needs the projection of a "
            f"tied softmax ({prefix}tie_weights=true, {prefix}mos_components=1); with a "
            f"mixture of softmaxes use {prefix}mos_dropout"
        )
    elif o.projection_dropout > 0 and m.num_params is None and m.embedding_ratio is None:
        if (m.embedding_size or m.hidden_size) == m.hidden_size:
            problems.append(
                f"{prefix}projection_dropout={o.projection_dropout!r} needs a projection: "
                f"model.embedding_size ({m.embedding_size}) different from "
                f"model.hidden_size ({m.hidden_size})"
            )
    return problems


def _check_recipe(m: ModelConfig) -> list[str]:
    """The paper's regularisation and initialisation fields (see docs/reproduce.md)."""
    from moglstm.lm.budget import parse_count  # budget imports nothing from here

    problems = _choice("model.dropout_mask", m.dropout_mask, DROPOUT_MASKS)
    if m.state_dropout_mask is not None:
        problems += _choice("model.state_dropout_mask", m.state_dropout_mask, DROPOUT_MASKS)
    problems += _choice("model.init", m.init, INITS)
    if m.num_params is not None:
        try:
            parse_count(m.num_params)
        except ValueError as exc:
            problems.append(f"model.num_params: {exc}")
    if m.embedding_ratio is not None and m.embedding_size is not None:
        problems.append(
            f"model.embedding_ratio={m.embedding_ratio!r} and model.embedding_size="
            f"{m.embedding_size!r} are alternatives: give one or the other"
        )
    if m.kind not in RECURRENT_KINDS:
        problems += [
            f"model.{name}={getattr(m, name)!r} needs a recurrent model.kind (kind is {m.kind!r})"
            for name, default in _RECURRENT_ONLY.items()
            if getattr(m, name) != default
        ]
    if m.init == "official" and m.kind not in _FORGET_GATE_KINDS:
        problems.append(
            f"model.init='official' is defined for model.kind 'mogrifier' or 'lstm' "
            f"(kind is {m.kind!r})"
        )
    if m.forget_bias != 0 and m.kind not in _FORGET_GATE_KINDS:
        problems.append(
            f"model.forget_bias={m.forget_bias!r} needs a forget gate: model.kind 'mogrifier' "
            f"or 'lstm' (kind is {m.kind!r})"
        )
    return problems


def _check_transformer(m: ModelConfig, data: DataConfig | None) -> list[str]:
    t, prefix = m.transformer, "model.transformer."
    problems = _positive(t, prefix, ["d_model", "heads", "depth", "max_len"])
    problems += _positive(t, prefix, ["ffn_size"], optional=True)
    problems += range_problems(t, prefix)
    problems += _choice(f"{prefix}positional_kind", t.positional_kind, POSITIONAL_KINDS)
    if problems or m.kind != "transformer":
        return problems
    if t.d_model % t.heads:
        problems.append(
            f"{prefix}d_model={t.d_model} must be divisible by {prefix}heads={t.heads} "
            "(each head gets d_model / heads dimensions)"
        )
    if data is not None and data.bptt > t.max_len:
        problems.append(
            f"data.bptt={data.bptt} is longer than the transformer's {prefix}max_len={t.max_len}"
        )
    return problems


def _check_train(t: TrainConfig) -> list[str]:
    problems = _choice("train.schedule", t.schedule, SCHEDULES)
    problems += _choice("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    problems += _positive(t, "train.", ["max_steps", "eval_every", "log_every", "max_nonfinite"])
    problems += _positive(t, "train.", ["eval_max_tokens", "threads"], optional=True)
    problems += _at_least_zero(t, "train.", ["lr_patience", "early_stop_patience", "seed"])
    problems += _at_least_zero(t, "train.", ["average_after_bad_evals", "average_from_step"])
    problems += _at_least_zero(t, "train.", ["eval_temperature_tokens"])
    if not is_device_spec(t.device):
        problems.append(f"train.device={t.device!r} is not one of: {DEVICE_HELP}")
    if t.max_time is not None:
        from moglstm.lm.stopping import parse_duration  # stopping imports nothing from here

        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            problems.append(f"train.max_time: {exc}")
    return problems + range_problems(t, "train.")


def _check_accumulation(cfg: RunConfig) -> list[str]:
    accum, batch = cfg.train.accum_batch_size, cfg.data.batch_size
    if accum is None:
        return []
    if accum <= 0 or batch % accum:
        return [
            f"train.accum_batch_size={accum!r} must be a positive divisor of "
            f"data.batch_size={batch}"
        ]
    return []
