"""Reading configs written by older versions: one step per schema version.

Every saved config (``config.yaml``, a checkpoint's ``config``) carries ``version``; a
mapping without it is version 1, the flat model keys of moglstm 0.1.0. :func:`upgrade`
applies the steps from the mapping's version up to :data:`CONFIG_VERSION`, so renaming
a key later means adding a step here, and runs already written keep loading and
resuming. Presets and partial YAML files go through the same steps; a step leaves the
keys it does not know alone, so a partial config already in the new shape passes
unchanged.

Old key names keep working in dotted overrides too (``model.mogrify_rounds=3``):
:func:`current_key` maps them through :data:`MOVED_MODEL_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from moglstm.lm.config.schema import CONFIG_VERSION
from moglstm.lm.errors import ConfigError
from moglstm.lm.safety import short_repr

__all__ = ["MOVED_MODEL_KEYS", "current_key", "move_model_keys", "upgrade"]

#: Version 1 -> 2: the model's flat keys that moved into its nested sections.
MOVED_MODEL_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "mogrify_rounds": "mogrifier.rounds",
        "mogrify_rank": "mogrifier.rank",
        "coupled": "mogrifier.coupled",
        "peephole": "mogrifier.peephole",
        "cap_input_gate": "mogrifier.cap_input_gate",
        "implementation": "mogrifier.implementation",
        "tie_weights": "output.tie_weights",
        "sum_layer_outputs": "output.sum_layer_outputs",
        "mos_components": "output.mos_components",
        "mos_dropout": "output.mos_dropout",
        "projection_dropout": "output.projection_dropout",
        "d_model": "transformer.d_model",
        "heads": "transformer.heads",
        "depth": "transformer.depth",
        "ffn_size": "transformer.ffn_size",
        "positional": "transformer.positional",
        "positional_kind": "transformer.positional_kind",
        "max_len": "transformer.max_len",
        "dropout": "transformer.dropout",
    }
)


def move_model_keys(model: Mapping[str, Any], where: str = "model") -> dict[str, Any]:
    """Return the model section ``model`` with its version-1 flat keys moved into place.

    A key given both ways (``mogrify_rounds`` and ``mogrifier.rounds``) is an error
    naming both, unless the two agree.
    """
    out = dict(model)
    for old, new in MOVED_MODEL_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        section, leaf = new.split(".")
        nested = out.get(section)
        if nested is None:
            nested = out[section] = {}
        elif not isinstance(nested, Mapping):
            continue  # the schema check names the section that is not a mapping
        else:
            nested = out[section] = dict(nested)
        if leaf in nested and nested[leaf] != value:
            raise ConfigError(
                f"{where}.{old}={short_repr(value)} (the old name of {where}.{new}) and "
                f"{where}.{new}={short_repr(nested[leaf])} disagree: give one of them"
            )
        nested[leaf] = value
    return out


def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    if isinstance(d.get("model"), Mapping):
        d["model"] = move_model_keys(d["model"])
    return d


# step from version N to N + 1, for every N below CONFIG_VERSION
_STEPS: Mapping[int, Callable[[dict[str, Any]], dict[str, Any]]] = MappingProxyType(
    {1: _v1_to_v2}
)


def upgrade(d: Mapping[str, Any]) -> dict[str, Any]:
    """Return the config mapping ``d`` upgraded to :data:`CONFIG_VERSION`.

    ``d`` may be partial (a preset); without ``version`` it is read as version 1. The
    result has ``version`` set to the current one. ``d`` is not modified.

    Raises:
        ConfigError: ``version`` is not a known version (e.g. the config was written by
            a newer moglstm).
    """
    out = dict(d)
    version = out.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"version={short_repr(version)} must be a config version (1 or more)")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"version={version}: this config was written by a newer moglstm (this one reads "
            f"versions up to {CONFIG_VERSION}); upgrade moglstm"
        )
    for step in range(version, CONFIG_VERSION):
        out = _STEPS[step](out)
    out["version"] = CONFIG_VERSION
    return out


def current_key(key: str) -> str:
    """The current name of the dotted key ``key`` (``model.mogrify_rounds`` ->
    ``model.mogrifier.rounds``); any other key is returned as it is."""
    section, _, rest = key.partition(".")
    if section == "model" and rest in MOVED_MODEL_KEYS:
        return f"model.{MOVED_MODEL_KEYS[rest]}"
    return key
