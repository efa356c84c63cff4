"""Assembling a config: presets, YAML files and dotted command-line overrides.

A config is assembled in three layers, each overriding the one before::

    defaults (the dataclasses of moglstm.lm.config.schema)
      <- a preset (``presets/NAME.yaml`` or any YAML file: only the keys that differ)
      <- dotted overrides (``model.hidden_size=650``), typically from the command line

:func:`load_config` does all three and then :func:`~moglstm.lm.config.checks.validate`.
Presets, files and overrides of an older schema version are upgraded
(:mod:`moglstm.lm.config.upgrade`): ``model.mogrify_rounds=3`` still sets
``model.mogrifier.rounds``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from moglstm.lm.config.checks import validate
from moglstm.lm.config.plain import (
    _build,
    _coerce,
    _plain,
    _unknown_key_message,
    from_dict,
    hints,
    to_dict,
)
from moglstm.lm.config.schema import RunConfig
from moglstm.lm.config.upgrade import current_key, move_model_keys
from moglstm.lm.errors import ConfigError, ConfigTypeError
from moglstm.lm.safety import (
    describe_path,
    load_yaml,
    load_yaml_file,
    short_repr,
    write_atomic,
)

__all__ = [
    "apply_overrides",
    "list_presets",
    "load_config",
    "load_preset",
    "read_config",
    "save_config",
    "to_yaml",
]

_PRESET_SUFFIXES = (".yaml", ".yml")


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
        raise ConfigTypeError(f"override {short_repr(item)}: expected a 'key=value' string")
    key, sep, raw = item.partition("=")
    key = current_key(key.strip())  # an old name (model.mogrify_rounds) reaches its field
    if not sep or not key:
        raise ConfigError(
            f"malformed override {short_repr(item)}: expected 'key=value', e.g. data.bptt=35"
        )
    tp = _field_type(key)
    value = load_yaml(raw, f"override {short_repr(item)}: cannot parse the value, which")
    if _is_str_field(tp) and not isinstance(value, str) and not _takes_none(tp, value):
        value = raw.strip()  # e.g. name=2024 or name=2024-01-01 stay text
    if key == "model" and isinstance(value, dict):
        value = move_model_keys(value)
    if dataclasses.is_dataclass(tp):  # a whole section: merge only the keys given
        return key, _given(_build(tp, value, f"{key}."), value)
    return key, _plain(_coerce(value, tp, key))


def _given(section: Any, value: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``value`` (recursively) with their checked values from ``section``."""
    out = {}
    for k, v in value.items():
        checked = getattr(section, k)
        nested = dataclasses.is_dataclass(checked) and isinstance(v, dict)
        out[k] = _given(checked, v) if nested else _plain(checked)
    return out


def _field_type(key: str) -> Any:
    """Walk the dataclass schema along ``key``; return the field type at its end."""
    prefix, tp = "", RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"override key '{key}': '{prefix.rstrip('.')}' is not a section")
        fields = hints(tp)
        if part not in fields:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), tp, prefix))
        tp, prefix = fields[part], f"{prefix}{part}."
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
        _merge(d[leaf], value)
    else:
        d[leaf] = value


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    for k, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v




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
        raise ConfigError(  # say so without quoting a file that is not a config at all
            f"{label} is not a moglstm config: none of its {len(data)} top-level keys is one "
            f"of {', '.join(hints(RunConfig))}"
        )
    if default_name is not None:
        data.setdefault("name", default_name)
    try:
        return from_dict(data)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{label}: {exc}") from exc


def _config_like(key: Any) -> bool:
    """A top-level key that is a config key, or a near miss worth naming (``modle``)."""
    valid = list(hints(RunConfig))
    return isinstance(key, str) and bool(difflib.get_close_matches(key, valid, n=1, cutoff=0.75))


def _read_yaml_mapping(path: Path, label: str) -> dict[str, Any]:
    problem = describe_path(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"{label} not found")
    if problem is not None:
        raise ConfigError(f"{label} {problem}")
    data = load_yaml_file(path, label, error=ConfigError)
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must hold a mapping of config keys, got {type(data).__name__}")
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
        raise ConfigError(
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
