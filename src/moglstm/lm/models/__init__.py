"""Language models behind one interface.

Every model maps time-major token ids to next-token logits and an opaque state::

    logits, state = model(tokens, state)  # tokens (T, B) long -> logits (T, B, V)

``state=None`` means "start from zeros". Recurrent models return their final
hidden state, which the caller hands back (after
:func:`~moglstm.lm.state.detach_state`) with the next window; the Transformer keeps
no state and always returns ``None``. So a training loop never needs to know which
kind of model it drives.

:func:`build_model` turns a :class:`~moglstm.lm.config.ModelConfig` into a model;
the model classes take the config (or its ``transformer`` settings) whole. Modules:
:mod:`~moglstm.lm.models.kinds` (the choices), :mod:`~moglstm.lm.models.recurrent`,
:mod:`~moglstm.lm.models.transformer`, :mod:`~moglstm.lm.models.build`.
"""

from __future__ import annotations

from moglstm.lm.layers import LockedDropout
from moglstm.lm.models.build import (
    build_model,
    build_on_meta,
    count_parameters,
    parameter_count,
    resolve_sizes,
    with_resolved_sizes,
)
from moglstm.lm.models.kinds import MODEL_KINDS, POSITIONAL_KINDS, RECURRENT_KINDS
from moglstm.lm.models.recurrent import RNNLanguageModel, init_official, softmax_temperature
from moglstm.lm.models.transformer import TransformerLanguageModel
from moglstm.lm.state import detach_state

__all__ = [
    "MODEL_KINDS",
    "POSITIONAL_KINDS",
    "RECURRENT_KINDS",
    "LockedDropout",
    "RNNLanguageModel",
    "TransformerLanguageModel",
    "build_model",
    "build_on_meta",
    "count_parameters",
    "parameter_count",
    "detach_state",
    "init_official",
    "resolve_sizes",
    "with_resolved_sizes",
    "softmax_temperature",
]
