"""Pure layers: the Mogrifier, the Mogrifier LSTM cell and the multi-layer module."""

import torch

from moglstm.nn import functional
from moglstm.nn.cell import MogrifierLSTMCell
from moglstm.nn.mogrifier import Mogrifier
from moglstm.nn.rnn import MogrifierLSTM

__all__ = ["Mogrifier", "MogrifierLSTM", "MogrifierLSTMCell", "functional"]

# A whole module saved with torch.save(model) loads with torch.load(f) (weights_only=True,
# torch's default) once moglstm is imported, as torch.nn's own modules do: the classes
# hold nothing but parameters, submodules and plain attributes.
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([Mogrifier, MogrifierLSTM, MogrifierLSTMCell])
