"""Run configuration: dataclasses, versions, YAML presets and dotted overrides.

The package is cut by what each part is for; everything public is re-exported here:

* :mod:`~moglstm.lm.config.schema`: the dataclasses and their defaults;
* :mod:`~moglstm.lm.config.upgrade`: configs of older versions, old key names;
* :mod:`~moglstm.lm.config.plain`: plain dicts in and out (strict);
* :mod:`~moglstm.lm.config.checks`: every rule, checked once, all problems at once;
* :mod:`~moglstm.lm.config.files`: presets, YAML files, overrides, :func:`load_config`.

A config is saved as YAML in every run folder and inside every checkpoint (as a plain
dict, with its ``version``), so a run can be rebuilt from either alone.
"""

from __future__ import annotations

from moglstm.lm.config.checks import check_model, model_problems, validate
from moglstm.lm.config.files import (
    apply_overrides,
    list_presets,
    load_config,
    load_preset,
    read_config,
    save_config,
    to_yaml,
)
from moglstm.lm.config.plain import from_dict, to_dict
from moglstm.lm.config.schema import (
    CONFIG_VERSION,
    DataConfig,
    ModelConfig,
    MogrifierSettings,
    OutputSettings,
    RunConfig,
    TrainConfig,
    TransformerSettings,
)
from moglstm.lm.config.upgrade import MOVED_MODEL_KEYS, current_key, upgrade

__all__ = [
    "CONFIG_VERSION",
    "MOVED_MODEL_KEYS",
    "DataConfig",
    "ModelConfig",
    "MogrifierSettings",
    "OutputSettings",
    "RunConfig",
    "TrainConfig",
    "TransformerSettings",
    "apply_overrides",
    "check_model",
    "current_key",
    "from_dict",
    "list_presets",
    "load_config",
    "load_preset",
    "model_config",
    "model_problems",
    "read_config",
    "save_config",
    "to_dict",
    "to_yaml",
    "upgrade",
    "validate",
]


def model_config(**settings: object) -> ModelConfig:
    """A :class:`ModelConfig` from keyword settings, old flat names included.

    ``model_config(kind="lstm", hidden_size=32)`` or, with the names of config version
    1, ``model_config(mogrify_rounds=3, d_model=64)``; nested sections are given as
    mappings (``mogrifier={"rounds": 3}``). Values are checked and converted as
    :func:`from_dict` does, and the result is checked by :func:`check_model`.
    """
    from moglstm.lm.config.upgrade import move_model_keys

    return check_model(from_dict({"model": move_model_keys(settings)}).model)
