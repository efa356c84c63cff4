"""MogrifierLSTM with the rest of PyTorch: torch.compile, torch.export, ONNX, torch.func,
autocast, checkpointing, DDP, torch.jit.trace (each row of docs/interop.md's table)."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from moglstm.nn import Mogrifier, MogrifierLSTM, MogrifierLSTMCell

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.double
IMPLEMENTATIONS = ["auto", "fused", "reference"]


def twins(implementation, dtype=torch.float32, **kw):
    """A module and a reference twin with the same weights."""
    torch.manual_seed(0)
    kw = {"mogrify_rounds": 3, "mogrify_rank": 2, **kw}
    mine = MogrifierLSTM(5, 4, implementation=implementation, **kw).to(dtype)
    ref = MogrifierLSTM(5, 4, implementation="reference", **kw).to(dtype)
    ref.load_state_dict(mine.state_dict())
    return mine, ref


def grads(module, x, hx=None):
    out, (h, c) = module(x, hx)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + c.sum()
    return [out, h, c, *torch.autograd.grad(loss, [x, *module.parameters()])]


# -- torch.compile


# (T, B) in turn; not T = 5 = input_size (with dynamic=True, equal sizes share a symbol)
SHAPES = [(7, 3), (9, 3), (9, 2), (4, 6), (12, 2), (3, 4), (6, 1)]
# graphs compiled after each shape of SHAPES, as docs/interop.md states them: by default the
# first shape is compiled static, a new length recompiles with T dynamic, a new batch with
# B dynamic; dynamic=True starts symbolic. A batch of 1 is specialized either way.
GRAPHS = {"default": [1, 2, 3, 3, 3, 3, 4], "dynamic": [1, 1, 1, 1, 1, 1, 2]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "implementation, setting", [("auto", "default"), ("auto", "dynamic"), ("fused", "dynamic")]
)
def test_compile_fullgraph_graphs_per_window(implementation, setting):
    """No graph break (fullgraph), the fused op kept as one node, outputs and gradients
    equal the reference's, and the graphs compiled over SHAPES are GRAPHS[setting]."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    mine, ref = twins(implementation, num_layers=2, bidirectional=True)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    dynamic = {"default": None, "dynamic": True}[setting]
    compiled = torch.compile(mine, fullgraph=True, dynamic=dynamic, backend=counter)
    graphs = []
    for T, B in SHAPES:
        x = torch.randn(T, B, 5, requires_grad=True)
        for a, b in zip(grads(compiled, x), grads(ref, x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # Dynamo also counts an empty frame around the module call
        graphs.append(sum(1 for g in counter.graphs if len(g.graph.nodes)))
    assert graphs == GRAPHS[setting]
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert "moglstm.fused_direction.default" in ops


@pytest.mark.slow
def test_compile_reference_unrolls_the_window():
    """The reference path compiles too, unrolled: the graph is per window length."""
    import torch._dynamo.testing

    mine, ref = twins("reference")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(mine, fullgraph=True, backend=counter)
    x = torch.randn(3, 2, 5, requires_grad=True)
    for a, b in zip(grads(compiled, x), grads(ref, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "moglstm" not in str([n.target for g in counter.graphs for n in g.graph.nodes])


def test_fused_op_passes_opcheck():
    """The custom op's schema, fake kernel and autograd registration agree with its kernel."""
    from moglstm.nn.backends import op

    rnn = MogrifierLSTM(5, 4, mogrify_rounds=3, mogrify_rank=2, peephole=True).double()
    d = rnn.direction(0, 0)
    x, h = torch.randn(4, 2, 5, dtype=D), torch.randn(2, 4, dtype=D)
    flat = [w.detach().requires_grad_() for w in d.flat()]
    args = ("auto", d.spec.encode(), x.requires_grad_(), h, h, None, flat)
    # not test_aot_dispatch_*: the saved arena's alignment padding is never written
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op.fused_direction, args, test_utils=utils)
    out, h_n, c_n = op.run_op("auto", x, h, h, d, False, None)
    ref = MogrifierLSTM(5, 4, mogrify_rounds=3, mogrify_rank=2, peephole=True).double()
    ref.load_state_dict(rnn.state_dict())
    torch.testing.assert_close(out, ref(x, (h[None], h[None]))[0], rtol=1e-12, atol=1e-12)


# -- torch.export and ONNX


def export(module, x, hx):
    T, B = torch.export.Dim("T", min=2, max=4096), torch.export.Dim("B", min=2, max=4096)
    shapes = ({0: B, 1: T}, ({1: B}, {1: B}))
    return torch.export.export(module, (x, hx), dynamic_shapes=shapes)


def batch_first_inputs(T, B, layers=1, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, T, 5), (torch.randn(layers, B, 4), torch.randn(layers, B, 4))


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["auto", "fused"])
def test_export_with_dynamic_window_and_batch(implementation):
    """torch.export with a symbolic window length and batch: the program runs other
    shapes. "auto" exports the scan loop (portable), "fused" the custom op."""
    rnn = twins(implementation, batch_first=True, num_layers=2, mogrify_rounds=2)[0].eval()
    program = export(rnn, *batch_first_inputs(6, 4, layers=2))  # B = hidden_size: not tied
    ops = {str(n.target) for n in program.graph.nodes}
    if implementation == "fused":
        assert "moglstm.fused_direction.default" in ops
    else:
        assert any("scan" in op for op in ops) and not any("moglstm" in op for op in ops)
    x, hx = batch_first_inputs(11, 2, layers=2, seed=1)
    for a, b in zip(program.module()(x, hx), rnn(x, hx), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_export_reference_unrolls_a_fixed_window():
    rnn = twins("reference", batch_first=True)[0].eval()
    x, hx = batch_first_inputs(3, 2)
    program = torch.export.export(rnn, (x, hx))
    for a, b in zip(program.module()(x, hx), rnn(x, hx), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_onnx_export_runs_other_lengths_in_onnxruntime(tmp_path):
    """ONNX with a dynamic window and batch (an ONNX Scan), run by onnxruntime on a window
    of another length and batch than exported, compared with PyTorch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    rnn = MogrifierLSTM(5, 4, batch_first=True, mogrify_rounds=2, mogrify_rank=2).eval()
    x, hx = batch_first_inputs(6, 3)
    T, B = torch.export.Dim("T", min=2, max=4096), torch.export.Dim("B", min=2, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            rnn, (x, hx), dynamic_shapes=({0: B, 1: T}, ({1: B}, {1: B})), dynamo=True
        )
    path = tmp_path / "mogrifier.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    for T_, B_ in [(13, 2), (3, 5)]:
        x, (h, c) = batch_first_inputs(T_, B_, seed=T_)
        got = session.run(None, dict(zip(names, [x.numpy(), h.numpy(), c.numpy()], strict=True)))
        out, (h_n, c_n) = rnn(x, (h, c))
        for a, b in zip(got, (out, h_n, c_n), strict=True):
            torch.testing.assert_close(torch.from_numpy(a), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "tracer, implementation, expected",
    [
        ("compile", "auto", "library-op"),
        ("compile", "fused", "library-op"),
        ("compile", "reference", "reference"),
        ("export", "auto", "scan"),
        ("export", "fused", "library-op"),
        ("onnx", "fused", "scan"),
        ("onnx", "reference", "reference"),
        ("func", "auto", "reference"),
        ("func", "fused", "reference"),
        ("forward-ad", "auto", "reference"),
        ("forward-ad", "fused", "reference"),
    ],
)
def test_backend_under_each_tracer(monkeypatch, tracer, implementation, expected):
    from moglstm.nn import backends
    from moglstm.nn.direction import Steps

    if tracer in ("compile", "export", "onnx"):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: tracer in ("export", "onnx"))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: tracer == "onnx")
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: tracer == "func")
    if tracer == "forward-ad":
        monkeypatch.setattr(torch.autograd.forward_ad, "_current_level", 0)
    steps = Steps(torch.randn(3, 2, 5), None)
    assert backends.select(implementation, steps, True).name in expected.split("|")


TRACE_REFUSED = "torch.jit.trace.*5 steps.*torch.export.export.*dynamo=True"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("packed", [False, True])
def test_jit_trace_is_refused_instead_of_truncating(implementation, packed):
    """Every implementation loops over the steps in Python: traced at T=5, a module would
    run 5 steps at T=8 (torch.nn.LSTM's trace runs 8). So tracing is refused, with an error
    that names the exporters that keep the length symbolic; they run every length."""
    rnn = twins(implementation)[0].eval()
    pack = torch.nn.utils.rnn.pack_padded_sequence

    def run(x):
        return rnn(pack(x, [5, 3]))[1] if packed else rnn(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings
        with pytest.raises(RuntimeError, match=TRACE_REFUSED):
            torch.jit.trace(run, (torch.randn(5, 2, 5),))
        lstm = torch.jit.trace(torch.nn.LSTM(5, 4).eval(), (torch.randn(5, 2, 5),))
    for T in (3, 8, 9):  # what the refusal stands in for: torch's trace runs every length
        assert lstm(torch.randn(T, 2, 5))[0].shape[0] == T
    # the cell and the Mogrifier are one step each: they trace and run at any batch
    cell = MogrifierLSTMCell(5, 4, mogrify_rounds=3, mogrify_rank=2).eval()
    traced = torch.jit.trace(cell, (torch.randn(2, 5),))
    x1 = torch.randn(7, 5)
    torch.testing.assert_close(traced(x1), cell(x1))


def test_torchscript_onnx_exporter_is_refused_instead_of_truncating(tmp_path):
    """torch.onnx.export(..., dynamo=False, dynamic_axes=...) traces with torch.jit: the
    model would return 5 steps for a window of 9. Refused, naming the dynamo exporter
    (test_onnx_export_runs_other_lengths_in_onnxruntime runs that one in onnxruntime)."""
    pytest.importorskip("onnx")
    rnn = twins("auto", batch_first=True)[0].eval()
    x = torch.randn(2, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=TRACE_REFUSED):
            torch.onnx.export(
                rnn,
                (x,),
                str(tmp_path / "m.onnx"),
                dynamo=False,
                input_names=["x"],
                dynamic_axes={"x": {0: "B", 1: "T"}},
            )


# -- torch.func


@pytest.mark.parametrize("rounds", [3, 0])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_func_grad_vjp_jacrev_and_grad_of_grad(implementation, rounds):
    """torch.func's reverse-mode transforms on every implementation equal the reference's
    (docs/interop.md: "auto" and "fused" run the reference under them)."""
    mine, ref = twins(implementation, dtype=D, mogrify_rounds=rounds)
    x = torch.randn(5, 2, 5, dtype=D)

    def f(module):
        return lambda params, x: functional_call(module, params, (x,))[0]

    def loss(module):
        return lambda params, x: f(module)(params, x).pow(2).sum()

    def input_grad_norm(module, params):
        return lambda x: grad(loss(module), argnums=1)(params, x).pow(2).sum()

    def transforms(module):
        params = dict(module.named_parameters())
        out, pullback = vjp(f(module), params, x)
        return [
            *grad(loss(module))(params, x).values(),
            *pullback(torch.linspace(-1, 1, out.numel(), dtype=D).view_as(out))[0].values(),
            jacrev(f(module), argnums=1)(params, x),
            jacrev(jacrev(lambda x: f(module)(params, x).sum()))(x),
            grad(input_grad_norm(module, params))(x),
        ]

    for a, b in zip(transforms(mine), transforms(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("implementation", ["auto", "fused"])
def test_func_vmap_and_jvp(implementation):
    """vmap and forward-mode AD (torch.func.jvp, dual tensors) run the reference."""
    import torch.autograd.forward_ad as fwAD

    mine, ref = twins(implementation)
    xs = torch.randn(3, 4, 2, 5)  # 3 independent calls
    params = dict(mine.named_parameters())
    out = vmap(lambda x: functional_call(mine, params, (x,))[0])(xs)
    torch.testing.assert_close(out, torch.stack([ref(x)[0] for x in xs]))
    out, tangent = jvp(lambda x: functional_call(mine, params, (x,))[0], (xs[0],), (xs[1],))
    out_ref, tangent_ref = jvp(lambda x: ref(x)[0], (xs[0],), (xs[1],))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(tangent, tangent_ref)
    with fwAD.dual_level():
        dual = mine(fwAD.make_dual(xs[0], xs[1]))[0]
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, tangent_ref)


def test_fused_node_refuses_vmap_and_forward_mode():
    """The fused autograd node itself (reached only by calling a backend directly) says
    what to use instead of failing inside its step loop."""
    from moglstm.nn.backends import TORCH_LOOP
    from moglstm.nn.direction import Steps

    rnn = twins("fused")[0]
    d, h = rnn.direction(0, 0), torch.zeros(2, 4)
    xs = torch.randn(3, 4, 2, 5)
    with pytest.raises(NotImplementedError, match="vmap.*implementation='auto'"):
        vmap(lambda x: TORCH_LOOP.run(Steps(x, None), h, h, d)[0])(xs)
    with pytest.raises(NotImplementedError, match="jvp.*implementation='auto'"):
        jvp(lambda x: TORCH_LOOP.run(Steps(x, None), h, h, d)[0], (xs[0],), (xs[1],))


# -- autocast


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_autocast_follows_torch_lstm(implementation):
    """Under CPU autocast the output and state are bfloat16 as torch.nn.LSTM's; the result
    is the module run in bfloat16, and backward called inside the autocast block runs in
    the forward's precision (custom_fwd/custom_bwd semantics)."""
    mine, _ = twins(implementation)
    low = twins("reference", dtype=torch.bfloat16)[0]  # the same weights in bfloat16
    x = torch.randn(9, 2, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.LSTM(5, 4)(x)
        out, (h, c) = mine(x)
        assert (out.dtype, h.dtype, c.dtype) == (expected[0].dtype,) * 3 == (torch.bfloat16,) * 3
        out.float().sum().backward()
    low_x = x.detach().bfloat16().requires_grad_()
    low_out = low(low_x)[0]
    low_out.float().sum().backward()
    torch.testing.assert_close(out, low_out, rtol=0.02, atol=0.02)
    assert x.grad.dtype == torch.float32 and mine.weight_hh_l0.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, low_x.grad.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(
        mine.weight_hh_l0.grad, low.weight_hh_l0.grad.float(), rtol=0.05, atol=0.05
    )


def test_autocast_leaves_float64_alone():
    mine = twins("auto", dtype=D)[0]
    x = torch.randn(9, 2, 5, dtype=D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mine(x)[0].dtype == D == torch.nn.LSTM(5, 4).double()(x)[0].dtype


def test_fused_backward_ignores_an_enclosing_autocast():
    """A float32 fused forward, backward() inside an autocast block: float32 gradients equal
    to those outside it (the block does not push the backward's products to bfloat16)."""
    mine, _ = twins("fused")
    x = torch.randn(9, 2, 5, requires_grad=True)
    out = mine(x)[0]
    g_plain = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    out = mine(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_amp = torch.autograd.grad(out.sum(), x)[0]
    assert g_amp.dtype == torch.float32
    torch.testing.assert_close(g_amp, g_plain, rtol=1e-6, atol=1e-7)


# -- checkpointing, DDP


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_activation_checkpointing(implementation):
    mine, ref = twins(implementation, dtype=D)
    x = torch.randn(6, 2, 5, dtype=D, requires_grad=True)

    def run(module):
        out = checkpoint(lambda x: module(x)[0], x, use_reentrant=False)
        return torch.autograd.grad(out.pow(2).sum(), [x, *module.parameters()])

    for a, b in zip(run(mine), run(ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_distributed_data_parallel(implementation, free_port):
    """DDP (one gloo process) wraps the module; gradients equal the module's own."""
    mine, ref = twins(implementation)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(mine)
        x = torch.randn(6, 2, 5)
        ddp(x)[0].pow(2).sum().backward()
        ref(x)[0].pow(2).sum().backward()
        for a, b in zip(mine.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


# -- Mogrifier shapes


def test_mogrifier_takes_any_leading_dimensions():
    torch.manual_seed(1)
    mog = Mogrifier(5, 4, rounds=3, rank=2)
    x, h = torch.randn(2, 3, 6, 5), torch.randn(2, 3, 6, 4)
    xm, hm = mog(x, h)
    assert xm.shape == x.shape and hm.shape == h.shape
    flat = mog(x.reshape(-1, 5), h.reshape(-1, 4))
    torch.testing.assert_close(xm.reshape(-1, 5), flat[0])
    torch.testing.assert_close(hm.reshape(-1, 4), flat[1])
    with pytest.raises(ValueError, match="h must have shape"):
        mog(x, h[:, :2])


@pytest.mark.slow
def test_docs_interop_example_runs():
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
    for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
        exec(compile(block, "docs/interop.md", "exec"), {"__name__": "__docs__"})


def test_docs_interop_table_names_real_tests():
    """Every test docs/interop.md's table names exists, every row but torch.jit.script's
    names one, and the compile row states the graph counts the compile test asserts."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "interop.md").read_text()
    table = doc[doc.index('| | `"auto"`') : doc.index("## How it works")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    defined = {
        name
        for path in (root / "tests" / "nn").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)
    }
    for row in rows:
        named = re.findall(r"\b(test_\w+)\b(?!\.py)", row.rsplit("|", 2)[1])
        assert named or "jit.script" in row, row
        assert set(named) <= defined, set(named) - defined
    compile_row = next(row for row in rows if "torch.compile" in row)
    shapes = sum(1 for _, B in SHAPES if B > 1)
    assert f"`dynamic=True`: {GRAPHS['dynamic'][shapes - 1]} graph for {shapes} " in compile_row
    assert f"default settings: {GRAPHS['default'][shapes - 1]} graphs for {shapes} " in compile_row
    assert GRAPHS["default"][-1] == GRAPHS["default"][shapes - 1] + 1  # "a batch of 1 adds"
    assert GRAPHS["dynamic"][-1] == GRAPHS["dynamic"][shapes - 1] + 1
