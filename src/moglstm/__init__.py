"""moglstm: the Mogrifier LSTM (Melis et al., ICLR 2020) for PyTorch."""

from moglstm.nn import Mogrifier, MogrifierLSTM, MogrifierLSTMCell

__all__ = ["Mogrifier", "MogrifierLSTM", "MogrifierLSTMCell"]
__version__ = "0.1.0"
