"""What code written for torch.nn.LSTM touches: proj_size, its attributes, whole-module
save and load, isinstance."""

import sys
import textwrap
import warnings

import pytest
import torch

from moglstm.nn import Mogrifier, MogrifierLSTM, MogrifierLSTMCell
from tests import processes

D = torch.double
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("bidirectional, batch_first", [(False, False), (True, True)])
def test_proj_size_equals_torch_lstm(bidirectional, batch_first):
    torch.manual_seed(0)
    kw = {"bidirectional": bidirectional, "batch_first": batch_first, "proj_size": 3}
    ref = torch.nn.LSTM(5, 4, 2, **kw).double()
    mine = MogrifierLSTM(5, 4, 2, mogrify_rounds=0, **kw).double()
    mine.load_state_dict(ref.state_dict())  # strict: same names and shapes
    D_ = 2 if bidirectional else 1
    x = torch.randn(3, 6, 5, dtype=D, requires_grad=True)
    hx = (torch.randn(2 * D_, 3, 3, dtype=D), torch.randn(2 * D_, 3, 4, dtype=D))
    if not batch_first:
        x = x.transpose(0, 1)
    a, b = ref(x, hx), mine(x, hx)
    assert b[0].shape == a[0].shape and b[1][0].shape == (2 * D_, 3, 3)
    for u, v in zip((a[0], *a[1]), (b[0], *b[1]), strict=True):
        torch.testing.assert_close(v, u, **TIGHT)
    ga = torch.autograd.grad(a[0].sum() + a[1][1].sum(), [x, *ref.parameters()])
    gb = torch.autograd.grad(b[0].sum() + b[1][1].sum(), [x, *mine.parameters()])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, **TIGHT)


def test_proj_size_with_rounds_gates_the_projected_state():
    rnn = MogrifierLSTM(5, 6, 2, mogrify_rounds=4, mogrify_rank=2, proj_size=3)
    assert rnn.mogrifier_l0.hidden_size == 3 and rnn.mogrifier_l1.input_size == 3
    assert rnn.weight_hr_l1.shape == (3, 6) and rnn.weight_hh_l0.shape == (24, 3)
    out, (h, c) = rnn(torch.randn(4, 2, 5))
    assert out.shape == (4, 2, 3) and h.shape == (2, 2, 3) and c.shape == (2, 2, 6)
    assert "proj_size=3" in repr(rnn)


def test_proj_size_runs_on_the_reference_path_and_fused_refuses_it():
    x = torch.randn(9, 2, 5)
    auto = MogrifierLSTM(5, 4, proj_size=2)
    ref = MogrifierLSTM(5, 4, proj_size=2, implementation="reference")
    ref.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto(x)[0], ref(x)[0])
    with pytest.raises(ValueError, match="proj_size"):
        MogrifierLSTM(5, 4, proj_size=2, implementation="fused")(x)


@pytest.mark.parametrize("value, error", [(4, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_proj_size_checked(value, error):
    with pytest.raises(error, match="proj_size"):
        MogrifierLSTM(5, 4, proj_size=value)


@pytest.mark.parametrize("proj_size", [0, 2])
def test_lstm_attributes_as_torch(proj_size):
    kw = {"bidirectional": True, "proj_size": proj_size}
    ref = torch.nn.LSTM(5, 4, 2, **kw)
    mine = MogrifierLSTM(5, 4, 2, mogrify_rounds=0, **kw)
    assert mine.mode == ref.mode == "LSTM"
    assert mine._flat_weights_names == ref._flat_weights_names
    assert mine._all_weights == ref._all_weights
    assert [w.shape for w in mine._flat_weights] == [w.shape for w in ref._flat_weights]
    assert [[w.shape for w in ws] for ws in mine.all_weights] == [
        [w.shape for w in ws] for ws in ref.all_weights
    ]
    assert mine._flat_weights[0] is mine.weight_ih_l0
    peep = MogrifierLSTM(5, 4, peephole=True, mogrify_rounds=2)
    assert peep._flat_weights_names[-3:] == ["weight_ci_l0", "weight_cf_l0", "weight_co_l0"]


def test_assigned_weights_are_used():
    """Weight-drop wrappers assign a new tensor to weight_hh_l0 before each call."""
    rnn = MogrifierLSTM(3, 4, mogrify_rounds=2)
    x = torch.randn(5, 2, 3)
    before = rnn(x)[0]
    raw = rnn.weight_hh_l0
    del rnn._parameters["weight_hh_l0"]
    rnn.weight_hh_l0 = raw * 0
    assert rnn._flat_weights[1].abs().sum() == 0
    assert not torch.allclose(rnn(x)[0], before)


def test_not_a_subclass_of_torch_lstm():
    """Documented in docs/interop.md: code that finds an ``nn.LSTM`` replaces it or runs
    torch's LSTM kernel on its weights (dynamic quantization, exporters, cuDNN weight
    flattening): a subclass would silently lose the Mogrifier there."""
    rnn = MogrifierLSTM(3, 4)
    assert not isinstance(rnn, torch.nn.RNNBase)
    rnn.flatten_parameters()  # the method such code calls exists, as a no-op


CLIENT = '''
import torch
from torch import nn
from moglstm.nn import MogrifierLSTM


class RNNModel(nn.Module):
    """The word-language-model example's model with its constructor line swapped."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(10, 6)
        self.drop = nn.Dropout(0.2)
        self.rnn = MogrifierLSTM(6, 5, 2, dropout=0.2, mogrify_rounds=2, mogrify_rank=2)
        self.decoder = nn.Linear(5, 10)

    def forward(self, x, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(output)), hidden


torch.serialization.add_safe_globals([RNNModel, nn.Embedding, nn.Dropout, nn.Linear, nn.LSTM])
'''


def import_client(folder):
    """The client's model module, written into ``folder`` and imported from there."""
    (folder / "client_model.py").write_text(CLIENT)
    sys.path.insert(0, str(folder))
    try:
        import client_model
    finally:
        sys.path.remove(str(folder))
    return client_model


def test_whole_model_saved_and_loaded_with_weights_only(tmp_path):
    """The client's pattern: torch.save(model, f) after training, torch.load(f) (weights_only
    by default) in the same run and in another process (its generate.py)."""
    client_model = import_client(tmp_path)
    model = client_model.RNNModel().eval()
    x = torch.randint(0, 10, (4, 2))
    expected = model(x, None)[0]
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        torch.save(model, f)
    with open(path, "rb") as f:
        loaded = torch.load(f)
    torch.testing.assert_close(loaded(x, None)[0], expected)
    for module in (MogrifierLSTMCell(3, 4, peephole=True), Mogrifier(3, 4, 2, rank=1)):
        torch.save(module, tmp_path / "m.pt")
        assert type(torch.load(tmp_path / "m.pt")) is type(module)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import client_model
        with open({str(path)!r}, "rb") as f:
            model = torch.load(f)
        print(type(model.rnn).__name__)
    """)
    command = [sys.executable, "-c", script]
    done = processes.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MogrifierLSTM"


@pytest.mark.slow
def test_client_onnx_export_pattern(tmp_path):
    """The client's --onnx-export: torch.onnx.export(model, (tokens, hidden), path) with
    the defaults, then onnxruntime gives the model's output."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    client_model = import_client(tmp_path)
    model = client_model.RNNModel().eval()
    tokens = torch.zeros(35, 1, dtype=torch.long)
    hidden = (torch.zeros(2, 1, 5), torch.zeros(2, 1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (tokens, hidden), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    tokens = torch.randint(0, 10, (35, 1))
    feeds = [tokens.numpy(), hidden[0].numpy(), hidden[1].numpy()]
    got = session.run(None, dict(zip([i.name for i in session.get_inputs()], feeds, strict=True)))
    torch.testing.assert_close(torch.from_numpy(got[0]), model(tokens, hidden)[0].detach())
