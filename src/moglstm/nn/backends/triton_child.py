"""The first Triton check on a device, run in a child process.

``python -m moglstm.nn.backends.triton_child REQUEST`` (a JSON object from
:func:`moglstm.nn.backends.triton_check.child_request`) builds a problem of that
configuration (random weights, seed 0), compares its Triton window with the torch path
(:func:`~moglstm.nn.backends.triton_check.compare_window`) and prints one JSON line
``{"passed": bool, "what": str}``. Compiling it fills Triton's on-disk cache for the
parent. A crash here (an illegal memory access, a compiler abort) ends only this process;
the parent reads it from the exit status.
"""

from __future__ import annotations

import json
import sys

import torch

from moglstm.nn.backends import triton as tb
from moglstm.nn.backends.triton_check import compare_window
from moglstm.nn.direction import DirectionSpec


def flat_shapes(spec: DirectionSpec) -> list[tuple[int, ...]]:
    """The shapes of :meth:`Direction.flat`'s tensors for ``spec``, in its order."""
    shapes: list[tuple[int, ...]] = []
    for r, k in enumerate(spec.ranks):
        out, inp = spec.round_shape(r)
        shapes += [(out, inp)] if k is None else [(out, k), (k, inp)]
        shapes += [(out,)] if spec.round_bias else []
    G, H = spec.gate_rows, spec.hidden_size
    shapes += [(G, spec.input_size), (G, H)]
    shapes += [(G,), (G,)] if spec.bias else []
    if spec.peephole:
        shapes += [(H,)] * (2 if spec.coupled else 3)
    return shapes


def problem(request: dict) -> tuple:
    """``(spec, x, h, c, mask, flat, reverse)`` of the requested configuration: weights
    uniform in +-1/sqrt(H) (as torch.nn.LSTM's), seed 0."""
    spec = DirectionSpec.decode(request["spec"])
    device, dtype = torch.device(request["device"]), getattr(torch, request["dtype"])
    g = torch.Generator().manual_seed(0)
    scale = spec.hidden_size**-0.5

    def draw(*shape: int) -> torch.Tensor:
        return ((torch.rand(shape, generator=g) * 2 - 1) * scale).to(device, dtype)

    flat = [draw(*s) for s in flat_shapes(spec)]
    T, B = request["steps"], request["batch"]
    x = torch.randn(T, B, spec.input_size, generator=g).to(device, dtype)
    h, c = (torch.randn(B, spec.hidden_size, generator=g).to(device, dtype) for _ in range(2))
    mask = None
    if request["mask"]:
        mask = ((torch.rand(B, spec.hidden_size, generator=g) > 0.3) / 0.7).to(device, dtype)
    return spec, x, h, c, mask, flat, request["reverse"]


def main(argv: list[str]) -> int:
    request = json.loads(argv[0])
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(request["tf32"])
    spec, x, h, c, mask, flat, reverse = problem(request)
    passed, what = compare_window(spec, x, h, c, mask, flat, reverse)
    print(json.dumps({"passed": passed, "what": what, "precision": tb.precision(x.dtype)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
