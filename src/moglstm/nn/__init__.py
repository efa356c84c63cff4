"""Pure layers: the Mogrifier, the Mogrifier LSTM cell and the multi-layer module."""

from moglstm.nn import functional
from moglstm.nn.cell import MogrifierLSTMCell
from moglstm.nn.mogrifier import Mogrifier
from moglstm.nn.rnn import MogrifierLSTM

__all__ = ["Mogrifier", "MogrifierLSTM", "MogrifierLSTMCell", "functional"]
