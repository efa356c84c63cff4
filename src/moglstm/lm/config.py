"""Run configuration: dataclasses, YAML presets and dotted command-line overrides.

A run is described by one :class:`RunConfig` holding a :class:`DataConfig`, a
:class:`ModelConfig` and a :class:`TrainConfig`. It is saved as YAML in every run
folder and inside every checkpoint (as a plain dict), so a run can be rebuilt
from either alone.

A config is assembled in three layers, each overriding the one before::

    defaults (the dataclasses below)
      <- a preset (``presets/NAME.yaml`` or any YAML file: only the keys that differ)
      <- dotted overrides (``model.hidden_size=650``), typically from the command line

:func:`load_config` does all three and then :func:`validate`. Plain dicts go in
and out through :func:`from_dict` (strict: unknown keys and wrong types are
errors) and :func:`to_dict` (YAML/JSON-able: tuples become lists).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from moglstm.lm.safety import (
    MAX_YAML_BYTES,
    NONFINITE_POLICIES,
    describe_path,
    load_yaml,
    short_repr,
    write_atomic,
)

__all__ = [
    "CORPORA",
    "DEVICE_HELP",
    "DROPOUT_MASKS",
    "INITS",
    "INIT_FACTORS",
    "LEVELS",
    "MODEL_KINDS",
    "NONFINITE_POLICIES",
    "SCHEDULES",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "list_presets",
    "load_config",
    "load_preset",
    "read_config",
    "save_config",
    "to_dict",
    "to_yaml",
    "validate",
]

CORPORA = ("shakespeare", "ptb", "ptb-char", "wikitext-2", "enwik8", "text")
LEVELS = ("word", "char", "byte")
IMPLEMENTATIONS = ("auto", "fused", "reference", "triton")  # as moglstm.nn.MogrifierLSTM takes
MODEL_KINDS = ("mogrifier", "lstm", "gru", "rnn", "transformer")
SCHEDULES = ("constant", "plateau")
DROPOUT_MASKS = ("window", "step")  # model.dropout_mask, model.state_dropout_mask
INITS = ("default", "official")  # model.init
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_PRESET_SUFFIXES = (".yaml", ".yml")


@dataclass
class DataConfig:
    """Which corpus to read and how to cut it into training windows.

    See :mod:`moglstm.lm.data` for the meaning of each corpus; ``corpus="text"``
    reads the user's own files from ``path`` (a folder holding train.txt,
    valid.txt and test.txt) or from ``train_path``/``valid_path``/``test_path``.
    """

    corpus: str = "ptb"  # shakespeare (bundled) | ptb | ptb-char | wikitext-2 | enwik8 | text
    data_dir: str | None = None  # folder laid out like shared/data; else $MOGLSTM_DATA
    cache_dir: str | None = None  # where downloads go; else ~/.cache/moglstm
    path: str | None = None  # corpus=text: a folder with train/valid/test.txt
    train_path: str | None = None  # corpus=text: explicit files instead of `path`
    valid_path: str | None = None
    test_path: str | None = None
    level: str = "word"  # corpus=text: word | char
    batch_size: int = 64
    bptt: int = 70
    variable_length: bool = False  # AWD-LSTM style random window lengths
    eval_batch_size: int = 10


@dataclass
class ModelConfig:
    """The language model: a recurrent core (``kind`` mogrifier/lstm/gru/rnn) or a
    causal Transformer (``kind="transformer"``, which uses only the transformer fields).
    """

    kind: str = "mogrifier"  # mogrifier | lstm | gru | rnn | transformer
    # recurrent models
    hidden_size: int = 256
    embedding_size: int | None = None  # None: same as hidden_size
    num_layers: int = 2
    mogrify_rounds: int = 5
    mogrify_rank: int | None = None
    coupled: bool = False
    peephole: bool = False
    cap_input_gate: bool = False
    tie_weights: bool = True  # projection added when embedding_size != hidden_size
    embedding_dropout: float = 0.0  # drops whole word types
    input_dropout: float = 0.0  # on the embedding output
    layer_dropout: float = 0.0  # between recurrent layers
    state_dropout: float = 0.0  # on h fed back (mogrifier core only)
    output_dropout: float = 0.0  # on the last layer's output, before the softmax
    implementation: str = "auto"  # mogrifier core: auto | fused | reference | triton
    # the paper's regularisation and output layer (recurrent models; docs/reproduce.md)
    dropout_mask: str = "window"  # window: one mask per window (variational) | step: fresh per step
    state_dropout_mask: str | None = None  # window | step for state dropout; None: dropout_mask
    drop_state_probability: float = 0.0  # zero each stream's carried state w.p. this, per batch
    sum_layer_outputs: bool = False  # model output = sum of all layers' outputs (skip connections)
    forget_bias: float = 0.0  # added to the forget-gate bias at init (mogrifier/lstm)
    mos_components: int = 1  # mixture of softmaxes with K components; 1: a plain softmax
    mos_dropout: float = 0.0  # dropout on the mixture's component vectors (K > 1)
    projection_dropout: float = 0.0  # dropout after the hidden -> embedding projection (K = 1)
    init: str = "default"  # default | official: lamb's variance-scaling truncated normal
    embedding_init_factor: float = 1.0  # init=official: variance scale of the embedding
    cell_init_factor: float = 1.0  # init=official: ... of the recurrent layers
    output_init_factor: float = 1.0  # init=official: ... of the softmax layer (untied) and MoS
    embedding_ratio: float | None = None  # embedding_size = round(ratio * hidden_size)
    num_params: str | None = None  # budget ("24M", "24e6", 24000000): picks the hidden_size
    # transformer
    d_model: int = 256
    heads: int = 4
    depth: int = 2
    ffn_size: int | None = None  # None: 4 * d_model
    positional: bool = True
    positional_kind: str = "sinusoidal"  # sinusoidal | learned (when positional)
    max_len: int = 1024
    dropout: float = 0.1  # transformer dropout


@dataclass
class TrainConfig:
    """Optimiser (Adam/AdamW), learning-rate schedule, step counts and device."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.999)
    eps: float = 1e-9
    weight_decay: float = 0.0  # decoupled (AdamW)
    clip: float = 10.0  # gradient-norm clip; 0 disables
    schedule: str = "constant"  # constant | plateau
    lr_decay: float = 0.5  # factor applied on plateau
    lr_patience: int = 1  # validations without improvement before a decay
    max_steps: int = 1000
    max_time: str | None = None  # wall-clock budget of one session ("90m", "1h30m", "45s")
    eval_every: int = 200
    early_stop_patience: int = 0  # validations without improvement; 0 disables
    log_every: int = 20
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # mixed precision on CUDA; ignored elsewhere
    eval_max_tokens: int | None = None  # cap on validation tokens per check; None = all
    eval_temperature_tokens: int = 0  # >0: each validation searches the temperature on these
    l2: float = 0.0  # L2 penalty: loss += l2 * (sum of squares of the trainable parameters)
    average_after_bad_evals: int = 0  # average weights after N non-improving validations; 0: off
    average_from_step: int = 0  # average weights from this step at the latest; 0: off
    accum_batch_size: int | None = None  # split each batch into sub-batches of this many streams
    nonfinite: str = "stop"  # on a NaN/inf training loss: stop | skip | rollback
    rollback_lr_factor: float = 0.5  # nonfinite=rollback: lr multiplied by this
    max_nonfinite: int = 5  # more non-finite losses than this between checkpoints: stop
    check_memory: bool = True  # refuse a model whose training cannot fit in memory (lm/budget.py)
    dist_timeout: float = 300.0  # torchrun: seconds a rank waits for a stalled or dead peer


@dataclass
class RunConfig:
    """Everything a run needs: a name, an output folder and the three sections."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- plain dicts


def to_dict(cfg: Any) -> dict[str, Any]:
    """Return ``cfg`` (a :class:`RunConfig` or one of its sections) as a plain dict.

    Nested sections become nested dicts and tuples become lists, so the result
    can be written with ``yaml.safe_dump`` or ``json.dumps`` and stored in a
    checkpoint that ``torch.load(weights_only=True)`` reads back.

    Args:
        cfg: a config dataclass instance.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"cfg: expected a config dataclass instance, got {type(cfg).__name__}")
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a (possibly partial) plain mapping.

    Missing keys keep their defaults. Unknown keys at any level raise
    ``ValueError`` naming the dotted key and listing the valid keys of that
    section. Values are checked against the field types and coerced where it is
    lossless (an int for a float field, ``"1e-3"`` for a float, ``1000.0`` for an
    int, a list for a tuple); anything else raises ``TypeError`` naming the key
    and the value. Ranges and choices are not checked here: see :func:`validate`.

    Args:
        d: mapping shaped like the output of :func:`to_dict`.
    """
    return _build(RunConfig, d, "")


def _build(cls: type, d: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {short_repr(d)} ({type(d).__name__})")
    hints = _hints(cls)
    kwargs = {}
    for key, value in d.items():
        if not isinstance(key, str) or key not in hints:
            shown = key if isinstance(key, str) and len(key) <= 60 else short_repr(key, 60)
            raise ValueError(_unknown_key_message(f"{prefix}{shown}", cls, prefix))
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _hints(cls: type) -> dict[str, Any]:
    # Field types are strings under `from __future__ import annotations`; resolve them.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    valid = list(_hints(cls))
    section = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    message = f"unknown config key '{key}'; valid keys of {section}: {', '.join(valid)}"
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    return message + (f" (did you mean '{prefix}{close[0]}'?)" if close else "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; return it, losslessly converted."""
    if key in _COUNT_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a parameter count is text ("24M") but may be written as a number
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{key}.")
    if tp in _SCALAR_COERCERS:
        converted = _SCALAR_COERCERS[tp](value)
        if converted is not _INVALID:
            return _check_size(converted, key)
        raise TypeError(
            f"{key}: expected {_type_name(tp)}, got {short_repr(value)} ({type(value).__name__})"
        )
    raise TypeError(f"{key}: unsupported field type {tp!r}")


_MAX_INT = 2**63  # ints must fit in int64, as torch's seeds and sizes do
_MAX_STR = 4096  # characters in a string value (PATH_MAX)


def _check_size(value: Any, key: str) -> Any:
    """Refuse an int beyond int64 or an absurdly long string, naming the key."""
    if isinstance(value, int) and not isinstance(value, bool) and not -_MAX_INT <= value < _MAX_INT:
        raise ValueError(f"{key}={short_repr(value)} is out of range: it must fit in 64 bits")
    if isinstance(value, str) and len(value) > _MAX_STR:
        raise ValueError(f"{key}: a text of {len(value):,} characters is too long")
    return value


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{key}: expected a list, got {short_repr(value)} ({type(value).__name__})"
        )
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise TypeError(
            f"{key}: expected a list of {len(args)} values, got {len(value)}: {short_repr(value)}"
        )
    pairs = enumerate(zip(value, args, strict=True))
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)


_INVALID = object()  # sentinel: "cannot be converted"
# text fields that also take plain numbers
_COUNT_KEYS = frozenset({"model.num_params", "train.max_time"})
_TRUE_WORDS = ("true", "yes", "on")
_FALSE_WORDS = ("false", "no", "off")


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    return _INVALID


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return _INVALID
    return _INVALID


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, int):
        return value
    number = _to_float(value) if isinstance(value, (float, str)) else _INVALID
    if number is _INVALID or not math.isfinite(number) or not number.is_integer():
        return _INVALID
    return int(number)


def _to_str(value: Any) -> Any:
    return value if isinstance(value, str) else _INVALID


_SCALAR_COERCERS = types.MappingProxyType(
    {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
)


def _type_name(tp: Any) -> str:
    return {bool: "a bool", int: "an int", float: "a float", str: "a string"}[tp]


# --------------------------------------------------------------------------- validation


def validate(cfg: RunConfig) -> RunConfig:
    """Check types, choices, ranges and cross-field rules of ``cfg``.

    Every problem found is reported at once, one per line, in a single
    ``ValueError``; each names the dotted key and the offending value (choice
    errors also list the valid choices).

    Args:
        cfg: the config to check.

    Returns:
        ``cfg`` itself, so calls can be chained.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {type(cfg).__name__}")
    problems = _type_problems(cfg)
    if not problems:  # range checks assume the types are right
        problems = (
            _check_run(cfg) + _check_data(cfg.data) + _check_model(cfg) + _check_train(cfg.train)
        )
        problems += _check_accumulation(cfg)
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def _type_problems(cfg: RunConfig) -> list[str]:
    problems = _section_type_problems(cfg, "")
    if problems:  # a section that is not its dataclass cannot be inspected further
        return problems
    for name in ("data", "model", "train"):
        problems += _section_type_problems(getattr(cfg, name), f"{name}.")
    return problems


def _section_type_problems(section: Any, prefix: str) -> list[str]:
    problems = []
    for name, tp in _hints(type(section)).items():
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


def _fraction(key: str, value: float) -> list[str]:
    if 0.0 <= value < 1.0:
        return []
    return [f"{key}={value!r} must be in [0, 1)"]


def _check_run(cfg: RunConfig) -> list[str]:
    problems = []
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


_DROPOUTS = (
    "embedding_dropout",
    "input_dropout",
    "layer_dropout",
    "state_dropout",
    "output_dropout",
    "dropout",
)
_MOGRIFIER_ONLY = ("coupled", "peephole", "cap_input_gate")


def _check_model(cfg: RunConfig) -> list[str]:
    m = cfg.model
    problems = _choice("model.kind", m.kind, MODEL_KINDS)
    problems += _choice("model.implementation", m.implementation, IMPLEMENTATIONS)
    problems += _positive(m, "model.", ["hidden_size", "num_layers", "d_model", "heads"])
    problems += _positive(m, "model.", ["depth", "max_len"])
    problems += _positive(m, "model.", ["embedding_size", "mogrify_rank", "ffn_size"], True)
    problems += _at_least_zero(m, "model.", ["mogrify_rounds"])
    problems += [p for name in _DROPOUTS for p in _fraction(f"model.{name}", getattr(m, name))]
    problems += _finite(m, "model.")
    if m.kind != "mogrifier":
        if m.state_dropout > 0:
            problems.append(
                f"model.state_dropout={m.state_dropout!r} needs model.kind='mogrifier' "
                f"(kind is {m.kind!r})"
            )
        problems += [
            f"model.{name}=True needs model.kind='mogrifier' (kind is {m.kind!r})"
            for name in _MOGRIFIER_ONLY
            if getattr(m, name)
        ]
    problems += _check_paper_model(m)
    problems += _check_rank(m)
    if m.kind == "transformer" and not problems:
        problems += _check_transformer(m, cfg.data)
    return problems


def _check_rank(m: ModelConfig) -> list[str]:
    """A low rank must be below both sizes the mogrifier matrices connect (when known:
    with model.num_params the hidden size is solved later, skipping ranks that do not fit)."""
    if m.kind != "mogrifier" or not m.mogrify_rounds or m.mogrify_rank is None:
        return []
    if m.num_params is not None or m.mogrify_rank <= 0:
        return []
    if m.embedding_ratio is not None:
        embedding, what = max(1, round(m.embedding_ratio * m.hidden_size)), "embedding_ratio"
    else:
        embedding, what = m.embedding_size or m.hidden_size, "embedding_size"
    limit = min(m.hidden_size, embedding)
    if m.mogrify_rank < limit:
        return []
    return [
        f"model.mogrify_rank={m.mogrify_rank} must be below model.hidden_size={m.hidden_size} "
        f"and the embedding size ({embedding}, from model.{what}): a rank of {limit} or more "
        "is no cheaper than full matrices (model.mogrify_rank=null)"
    ]


_RECURRENT_ONLY = {  # field: its default; other values need a recurrent model kind
    "drop_state_probability": 0.0,
    "sum_layer_outputs": False,
    "mos_components": 1,
    "mos_dropout": 0.0,
    "embedding_ratio": None,
    "num_params": None,
    "state_dropout_mask": None,
    "projection_dropout": 0.0,
    "init": "default",
}
INIT_FACTORS = ("embedding_init_factor", "cell_init_factor", "output_init_factor")


def _check_paper_model(m: ModelConfig) -> list[str]:
    """The regularisation and output-layer fields of issue 4 (see docs/reproduce.md)."""
    from moglstm.lm.budget import parse_count  # budget imports nothing from here

    problems = _choice("model.dropout_mask", m.dropout_mask, DROPOUT_MASKS)
    if m.state_dropout_mask is not None:
        problems += _choice("model.state_dropout_mask", m.state_dropout_mask, DROPOUT_MASKS)
    problems += _choice("model.init", m.init, INITS)
    problems += _positive(m, "model.", INIT_FACTORS)
    problems += _fraction("model.drop_state_probability", m.drop_state_probability)
    problems += _fraction("model.mos_dropout", m.mos_dropout)
    problems += _fraction("model.projection_dropout", m.projection_dropout)
    problems += _positive(m, "model.", ["mos_components"])
    problems += _positive(m, "model.", ["embedding_ratio"], optional=True)
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
    if m.mos_dropout > 0 and m.mos_components == 1:
        problems.append(f"model.mos_dropout={m.mos_dropout!r} needs model.mos_components > 1")
    if m.kind == "transformer":
        problems += [
            f"model.{name}={getattr(m, name)!r} needs a recurrent model.kind (kind is "
            "'transformer')"
            for name, default in _RECURRENT_ONLY.items()
            if getattr(m, name) != default
        ]
    if m.projection_dropout > 0 and (m.mos_components > 1 or not m.tie_weights):
        problems.append(
            f"model.projection_dropout={m.projection_dropout!r} needs the projection of a tied "
            "softmax (model.tie_weights=true, model.mos_components=1); with a mixture of "
            "softmaxes use model.mos_dropout"
        )
    if m.init == "official" and m.kind not in ("mogrifier", "lstm"):
        problems.append(
            f"model.init='official' is defined for model.kind 'mogrifier' or 'lstm' "
            f"(kind is {m.kind!r})"
        )
    if m.forget_bias != 0 and m.kind not in ("mogrifier", "lstm"):
        problems.append(
            f"model.forget_bias={m.forget_bias!r} needs a forget gate: model.kind 'mogrifier' "
            f"or 'lstm' (kind is {m.kind!r})"
        )
    return problems


def _check_transformer(m: ModelConfig, data: DataConfig) -> list[str]:
    problems = []
    if m.d_model % m.heads:
        problems.append(
            f"model.d_model={m.d_model} must be divisible by model.heads={m.heads} "
            "(each head gets d_model / heads dimensions)"
        )
    if data.bptt > m.max_len:
        problems.append(
            f"data.bptt={data.bptt} is longer than the transformer's model.max_len={m.max_len}"
        )
    return problems


def _check_train(t: TrainConfig) -> list[str]:
    problems = _choice("train.schedule", t.schedule, SCHEDULES)
    problems += _choice("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    problems += _positive(t, "train.", ["lr", "eps", "max_steps", "eval_every", "log_every"])
    problems += _positive(t, "train.", ["max_nonfinite", "dist_timeout"])
    problems += _positive(t, "train.", ["eval_max_tokens"], optional=True)
    problems += _at_least_zero(
        t, "train.", ["weight_decay", "clip", "lr_patience", "early_stop_patience", "seed"]
    )
    problems += _at_least_zero(t, "train.", ["l2", "average_after_bad_evals", "average_from_step"])
    problems += _at_least_zero(t, "train.", ["eval_temperature_tokens"])
    problems += [p for i, b in enumerate(t.betas) for p in _fraction(f"train.betas[{i}]", b)]
    if not 0.0 < t.lr_decay <= 1.0:
        problems.append(f"train.lr_decay={t.lr_decay!r} must be in (0, 1]")
    if not 0.0 < t.rollback_lr_factor <= 1.0:
        problems.append(f"train.rollback_lr_factor={t.rollback_lr_factor!r} must be in (0, 1]")
    if _DEVICE_RE.fullmatch(t.device) is None:
        problems.append(f"train.device={t.device!r} is not one of: {DEVICE_HELP}")
    if t.max_time is not None:
        from moglstm.lm.stopping import parse_duration  # stopping imports nothing from here

        try:
            parse_duration(t.max_time)
        except ValueError as exc:
            problems.append(f"train.max_time: {exc}")
    return problems + _finite(t, "train.")


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


def _finite(section: Any, prefix: str) -> list[str]:
    problems = []
    for name in _hints(type(section)):
        values = getattr(section, name)
        for value in values if isinstance(values, tuple) else (values,):
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{prefix}{name}={values!r} must be finite")
    return problems


# --------------------------------------------------------------------------- overrides


def apply_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied.

    Each value is parsed as YAML by :func:`~moglstm.lm.safety.load_yaml` (safe_load's
    rules without aliases, so ``null``, ``true``, ``[0, 0.999]`` and numbers work) and
    then checked against the field's type as in :func:`from_dict`. For string fields
    the raw text is kept when YAML would read it as something else (``name=2024``
    gives ``"2024"``). A key naming a
    whole section takes a mapping (``model={kind: lstm, hidden_size: 650}``).
    The result is not validated: call :func:`validate` (as :func:`load_config` does).

    Args:
        cfg: the config to start from; it is not modified.
        overrides: items like ``"model.hidden_size=650"`` or ``"data.corpus=ptb-char"``.

    Example::

        >>> cfg = apply_overrides(RunConfig(), ["model.hidden_size=650", "train.betas=[0,0.999]"])
        >>> cfg.model.hidden_size, cfg.train.betas
        (650, (0.0, 0.999))
    """
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise TypeError(
            f"overrides: expected a sequence of 'key=value' strings, got {short_repr(overrides)}"
        )
    d = to_dict(cfg)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(d, key, value)
    return from_dict(d)


def _parse_override(item: Any) -> tuple[str, Any]:
    if not isinstance(item, str):
        raise TypeError(f"override {short_repr(item)}: expected a 'key=value' string")
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(
            f"malformed override {short_repr(item)}: expected 'key=value', e.g. model.bptt=35"
        )
    tp = _field_type(key)
    value = load_yaml(raw, f"override {short_repr(item)}: cannot parse the value, which")
    if _is_str_field(tp) and not isinstance(value, str) and not _takes_none(tp, value):
        value = raw.strip()  # e.g. name=2024 or name=2024-01-01 stay text
    if dataclasses.is_dataclass(tp):  # a whole section: merge only the keys given
        section = _build(tp, value, f"{key}.")
        return key, {k: _plain(getattr(section, k)) for k in value}
    return key, _plain(_coerce(value, tp, key))


def _field_type(key: str) -> Any:
    """Walk the dataclass schema along ``key``; return the field type at its end."""
    prefix, tp = "", RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"override key '{key}': '{prefix.rstrip('.')}' is not a section")
        hints = _hints(tp)
        if part not in hints:
            raise ValueError(_unknown_key_message(".".join(parts[: i + 1]), tp, prefix))
        tp, prefix = hints[part], f"{prefix}{part}."
    return tp


def _takes_none(tp: Any, value: Any) -> bool:
    return value is None and type(None) in typing.get_args(tp)


def _is_str_field(tp: Any) -> bool:
    return tp is str or (
        typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp)
    )


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        d = d[part]
    if isinstance(value, dict):  # a section: update, keeping the keys not given
        d[leaf].update(value)
    else:
        d[leaf] = value


# --------------------------------------------------------------------------- files and presets


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings with short lists kept on one line (``betas: [0.0, 0.999]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_ConfigDumper.add_representer(list, _represent_list)


def to_yaml(cfg: RunConfig) -> str:
    """Return ``cfg`` as YAML text: one key per line, sections in field order."""
    return yaml.dump(to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write ``cfg`` to ``path`` as YAML (parent folders are created).

    Args:
        cfg: the config to write.
        path: destination file, conventionally ``<run folder>/config.yaml``.

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, to_yaml(cfg).encode("utf-8"))  # replaces a planted link


def read_config(path: str | Path) -> RunConfig:
    """Read a config written by :func:`save_config` (or any full/partial YAML config).

    Strict like :func:`from_dict`; errors name the file. Not validated.

    Args:
        path: a YAML file.
    """
    path = Path(path)
    return _from_yaml_file(path, f"config file {str(path)!r}")


def _from_yaml_file(path: Path, label: str, default_name: str | None = None) -> RunConfig:
    data = _read_yaml_mapping(path, label)
    if data and not any(_config_like(k) for k in data):
        raise ValueError(  # say so without quoting a file that is not a config at all
            f"{label} is not a moglstm config: none of its {len(data)} top-level keys is one "
            f"of {', '.join(_hints(RunConfig))}"
        )
    if default_name is not None:
        data.setdefault("name", default_name)
    try:
        return from_dict(data)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{label}: {exc}") from exc


def _config_like(key: Any) -> bool:
    """A top-level key that is a config key, or a near miss worth naming (``modle``)."""
    valid = list(_hints(RunConfig))
    return isinstance(key, str) and bool(difflib.get_close_matches(key, valid, n=1, cutoff=0.75))


def _read_yaml_mapping(path: Path, label: str) -> dict[str, Any]:
    problem = describe_path(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"{label} not found")
    if problem is not None:
        raise ValueError(f"{label} {problem}")
    with open(path, "rb") as f:
        raw = f.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:
        raise ValueError(f"{label} is too long for a config (more than {MAX_YAML_BYTES:,} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label} is not UTF-8 text (byte offset {exc.start})") from None
    data = load_yaml(text, label)
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{label} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _preset_folder() -> Any:
    return resources.files("moglstm.lm") / "presets"


def list_presets() -> list[str]:
    """Return the names of the presets shipped in ``moglstm/lm/presets``, sorted."""
    return sorted(
        entry.name.rsplit(".", 1)[0]
        for entry in _preset_folder().iterdir()
        if entry.name.endswith(_PRESET_SUFFIXES)
    )


def _has_sep(text: str) -> bool:
    return "/" in text or "\\" in text


def load_preset(name_or_path: str | Path) -> RunConfig:
    """Return the defaults with a preset applied (not validated).

    A preset is a YAML file holding a partial config: only the keys that differ
    from the defaults. When it sets no ``name``, the run is named after the file.

    Args:
        name_or_path: a shipped preset name (see :func:`list_presets`), or the
            path of a ``.yaml``/``.yml`` file.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(_PRESET_SUFFIXES) or _has_sep(text):
        path = Path(name_or_path)
        return _from_yaml_file(path, f"preset file {short_repr(text, 300)}", default_name=path.stem)
    if text not in list_presets():
        raise ValueError(
            f"unknown preset {short_repr(text, 300)}; shipped presets: {', '.join(list_presets())} "
            "(or give the path of a .yaml file)"
        )
    resource = _preset_folder() / f"{text}.yaml"
    with resources.as_file(resource) as path:
        return _from_yaml_file(path, f"preset {text!r}", default_name=text)


def load_config(preset: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Assemble and validate a run config: defaults <- preset <- overrides.

    Args:
        preset: a shipped preset name, the path of a YAML file, or ``None`` for
            the defaults alone.
        overrides: dotted ``key=value`` items (see :func:`apply_overrides`).

    Returns:
        The validated :class:`RunConfig`.

    Example::

        >>> cfg = load_config("ptb-small", ["model.hidden_size=300", "train.max_steps=100"])
    """
    cfg = RunConfig() if preset is None else load_preset(preset)
    return validate(apply_overrides(cfg, overrides))
