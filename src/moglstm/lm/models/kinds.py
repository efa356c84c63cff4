"""The model choices the config offers, defined by the builders that act on them."""

from __future__ import annotations

__all__ = ["INITS", "INIT_FACTORS", "MODEL_KINDS", "POSITIONAL_KINDS", "RECURRENT_KINDS"]

#: ``model.kind`` values built as an :class:`~moglstm.lm.models.RNNLanguageModel`.
RECURRENT_KINDS = ("mogrifier", "lstm", "gru", "rnn")
#: Every ``model.kind``.
MODEL_KINDS = (*RECURRENT_KINDS, "transformer")
#: ``model.transformer.positional_kind`` (with ``positional=true``).
POSITIONAL_KINDS = ("sinusoidal", "learned")
#: ``model.init``: torch's schemes, or the official code's (``init_official``).
INITS = ("default", "official")
#: The variance scales of ``model.init=official``.
INIT_FACTORS = ("embedding_init_factor", "cell_init_factor", "output_init_factor")
