"""What code written for torch.nn.LSTM touches: proj_size, its attributes, whole-module
save and load, isinstance."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

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


# -- rounds 0 is torch.nn.LSTM, whatever is frozen

FROZEN = {
    "nothing": lambda name: False,
    "all weights": lambda name: True,
    "input weights and hidden bias": lambda name: "weight_ih" in name or "bias_hh" in name,
    "reverse direction": lambda name: "reverse" in name,
}


@pytest.mark.parametrize(
    "implementation",
    ["auto", "fused-compiled-loop", "fused-python-loop", "fused-torch-loop", "reference"],
)
@pytest.mark.parametrize("frozen", list(FROZEN))
@pytest.mark.parametrize("input_grad", [True, False])
def test_rounds_zero_equals_torch_lstm_under_every_freezing_pattern(
    monkeypatch, implementation, frozen, input_grad
):
    """mogrify_rounds=0 with torch.nn.LSTM's weights: the same outputs and the same
    gradients, for frozen weights (requires_grad=False), a frozen input, or both, on every
    implementation and step loop."""
    from moglstm.nn import _kernels

    if implementation in ("fused-python-loop", "fused-torch-loop"):
        monkeypatch.setattr(_kernels, "loop_available", lambda t: False)
    if implementation == "fused-torch-loop":
        monkeypatch.setattr(_kernels, "available", lambda t: False)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, 2, bidirectional=True).to(D)
    rnn = MogrifierLSTM(
        3, 4, 2, bidirectional=True, mogrify_rounds=0, implementation=implementation.split("-")[0]
    ).to(D)
    rnn.load_state_dict(lstm.state_dict())
    for module in (lstm, rnn):
        for name, p in module.named_parameters():
            p.requires_grad_(not FROZEN[frozen](name))
    x = torch.randn(6, 2, 3, dtype=D, requires_grad=input_grad)
    h0 = torch.randn(4, 2, 4, dtype=D)

    def run(module):
        out, (h, c) = module(x, (h0, h0))
        wrt = [t for t in (x, *module.parameters()) if t.requires_grad]
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=D).view_as(out)).sum() + c.sum()
        return [out, h, c, *(torch.autograd.grad(loss, wrt) if wrt else [])]

    mine, theirs = run(rnn), run(lstm)
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("frozen", ["all weights", "input weights and hidden bias"])
def test_rounds_zero_equals_torch_lstm_frozen_on_triton(frozen):
    """The Triton backend (float32; on CPU under TRITON_INTERPRET=1) with frozen weights."""
    pytest.importorskip("numpy")  # the interpreter needs it
    from moglstm.nn.backends.triton import unavailable_reason

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = unavailable_reason(torch.zeros(1, device=device))
    if reason:
        pytest.skip(f"Triton cannot run here: {reason}")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, bidirectional=True).to(device)
    rnn = MogrifierLSTM(3, 4, bidirectional=True, mogrify_rounds=0, implementation="triton")
    rnn.to(device).load_state_dict(lstm.state_dict())
    results = []
    for module in (rnn, lstm):
        for name, p in module.named_parameters():
            p.requires_grad_(not FROZEN[frozen](name))
        torch.manual_seed(1)
        x = torch.randn(4, 2, 3, device=device, requires_grad=True)
        out, (h, c) = module(x)
        wrt = [x, *(p for p in module.parameters() if p.requires_grad)]
        results.append([out, h, c, *torch.autograd.grad(out.pow(2).sum() + c.sum(), wrt)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "fused", "reference"])
def test_rounds_zero_equals_torch_lstm_under_torch_func(implementation):
    """torch.func's transforms of a frozen rounds-0 layer equal torch.nn.LSTM's."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 2, bidirectional=True).to(D)
    rnn = MogrifierLSTM(3, 2, bidirectional=True, mogrify_rounds=0, implementation=implementation)
    rnn.to(D).load_state_dict(lstm.state_dict())
    x = torch.randn(4, 2, 3, dtype=D)

    def of_x(module):
        params = {n: p.detach() for n, p in module.named_parameters()}  # all frozen
        return lambda x: torch.func.functional_call(module, params, (x,))[0]

    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(of_x(rnn))(x), transform(of_x(lstm))(x), **TIGHT)
    xs = torch.stack([x, x.flip(0)])  # torch.nn.LSTM has no vmap rule: compared per call
    torch.testing.assert_close(
        torch.func.vmap(of_x(rnn))(xs), torch.stack([of_x(lstm)(x) for x in xs]), **TIGHT
    )


# -- loading before moglstm is imported

LOAD_WITHOUT_IMPORT = """
import sys, torch
model = torch.load(sys.argv[1])  # weights_only=True, torch's default
program = torch.export.load(sys.argv[2])  # calls moglstm::fused_direction
x = torch.load(sys.argv[3])
assert "moglstm.nn" in sys.modules  # torch imported it, the script did not
print(type(model).__name__, (program.module()(x)[0] - model(x)[0]).abs().max().item())
"""


def run_python(script, *args, env):
    """Runs ``script`` in a fresh interpreter; its process group is ended whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


@pytest.mark.slow
def test_saved_model_and_exported_program_load_before_moglstm_is_imported(tmp_path):
    """pyproject's ``torch.backends`` entry point (torch calls it at ``import torch``)
    registers moglstm, so whole-model ``torch.load`` and ``torch.export.load`` of a program
    with the fused op work in a process that never imports moglstm. Without it
    (``TORCH_DEVICE_BACKEND_AUTOLOAD=0``), torch's own error names the class to import."""
    import moglstm

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(moglstm.__file__).resolve().parents[2]
    entry = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]
    # the installed package's metadata as pyproject declares it (this checkout may not be
    # the installed one): a dist-info folder on the child's path
    info = tmp_path / "site" / "moglstm_entry-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moglstm-entry\nVersion: 0\n")
    lines = [f"{k} = {v}" for k, v in entry["torch.backends"].items()]
    (info / "entry_points.txt").write_text("[torch.backends]\n" + "\n".join(lines) + "\n")
    torch.manual_seed(0)
    rnn = MogrifierLSTM(3, 4, mogrify_rounds=2, implementation="fused").eval()
    x = torch.randn(5, 2, 3)
    paths = [str(tmp_path / name) for name in ("model.pt", "program.pt2", "x.pt")]
    torch.save(rnn, paths[0])
    torch.export.save(torch.export.export(rnn, (x,)), paths[1])
    torch.save(x, paths[2])
    src = str(Path(moglstm.__file__).resolve().parents[1])
    path = os.pathsep.join([str(tmp_path / "site"), src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    code, out, err = run_python(LOAD_WITHOUT_IMPORT, *paths, env=env)
    assert code == 0, err
    name, diff = out.split()
    assert name == "MogrifierLSTM" and float(diff) < 1e-6
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    code, out, err = run_python(LOAD_WITHOUT_IMPORT, *paths, env=env)
    assert code != 0 and "moglstm.nn.rnn.MogrifierLSTM" in err
