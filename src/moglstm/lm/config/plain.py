"""Configs as plain dicts and back: :func:`to_dict` and the strict :func:`from_dict`.

:func:`from_dict` first upgrades the mapping to the current schema version
(:mod:`moglstm.lm.config.upgrade`), then checks every key and value type against the
dataclasses of :mod:`moglstm.lm.config.schema`, converting only where it is lossless.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from moglstm.lm.config.schema import RunConfig
from moglstm.lm.config.upgrade import upgrade
from moglstm.lm.errors import ConfigError, ConfigTypeError
from moglstm.lm.safety import short_repr

__all__ = ["from_dict", "hints", "to_dict"]


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
    :class:`~moglstm.lm.errors.ConfigError` (a ``ValueError``) naming the dotted key
    and listing the valid keys of that section. Values are checked against the field
    types and coerced where it is lossless (an int for a float field, ``"1e-3"`` for a
    float, ``1000.0`` for an int, a list for a tuple); anything else raises
    :class:`~moglstm.lm.errors.ConfigTypeError` (a ``TypeError`` too) naming the key
    and the value. Ranges and choices are not checked here: see :func:`validate`.

    A mapping of an older config version (no ``version`` key: version 1) is upgraded
    first, so checkpoints and config files written by earlier releases load.

    Args:
        d: mapping shaped like the output of :func:`to_dict`.
    """
    if not isinstance(d, Mapping):
        raise ConfigTypeError(
            f"config: expected a mapping, got {short_repr(d)} ({type(d).__name__})"
        )
    return _build(RunConfig, upgrade(d), "")


def _build(cls: type, d: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, Mapping):
        raise ConfigTypeError(
            f"{where}: expected a mapping, got {short_repr(d)} ({type(d).__name__})"
        )
    fields = hints(cls)
    kwargs = {}
    for key, value in d.items():
        if not isinstance(key, str) or key not in fields:
            shown = key if isinstance(key, str) and len(key) <= 60 else short_repr(key, 60)
            raise ConfigError(_unknown_key_message(f"{prefix}{shown}", cls, prefix))
        kwargs[key] = _coerce(value, fields[key], f"{prefix}{key}")
    return cls(**kwargs)


def hints(cls: type) -> dict[str, Any]:
    # Field types are strings under `from __future__ import annotations`; resolve them.
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    valid = list(hints(cls))
    section = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
    message = f"unknown config key '{key}'; valid keys of {section}: {', '.join(valid)}"
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    if close:
        return message + f" (did you mean '{prefix}{close[0]}'?)"
    # a key of a section given without it (hidden_size=100 for model.hidden_size)
    by_name: dict[str, str] = {}
    for dotted in _nested_keys(cls, prefix):
        by_name.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    found = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.85)
    return message + (f" (did you mean '{by_name[found[0]]}'?)" if found else "")


def _nested_keys(cls: type, prefix: str) -> list[str]:
    """The dotted keys inside the sections of ``cls`` (not its own keys), depth first."""
    out = []
    for name, tp in hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += [f"{prefix}{name}.{k}" for k in hints(tp)]
            out += _nested_keys(tp, f"{prefix}{name}.")
    return out


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
        raise ConfigTypeError(
            f"{key}: expected {_type_name(tp)}, got {short_repr(value)} ({type(value).__name__})"
        )
    raise TypeError(f"{key}: unsupported field type {tp!r}")


_MAX_INT = 2**63  # ints must fit in int64, as torch's seeds and sizes do
_MAX_STR = 4096  # characters in a string value (PATH_MAX)


def _check_size(value: Any, key: str) -> Any:
    """Refuse an int beyond int64 or an absurdly long string, naming the key."""
    if isinstance(value, int) and not isinstance(value, bool) and not -_MAX_INT <= value < _MAX_INT:
        raise ConfigError(f"{key}={short_repr(value)} is out of range: it must fit in 64 bits")
    if isinstance(value, str) and len(value) > _MAX_STR:
        raise ConfigError(f"{key}: a text of {len(value):,} characters is too long")
    return value


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(
            f"{key}: expected a list, got {short_repr(value)} ({type(value).__name__})"
        )
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    if len(value) != len(args):
        raise ConfigTypeError(
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
