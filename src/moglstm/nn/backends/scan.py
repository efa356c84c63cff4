"""The reference step as a ``scan`` loop: graphs with a symbolic window length.

The reference backend is a Python loop over the steps: a tracer (``torch.export``,
``torch.compile``) unrolls it, bakes the window length into the graph and traces it again
for every new length. Here the same step (:func:`moglstm.nn.functional.mogrify` then
:func:`~moglstm.nn.functional.lstm_cell`) is the body of torch's ``scan`` higher-order op,
traced once; ``torch.export`` keeps it as a loop with a symbolic length and the ONNX
exporter turns it into an ONNX ``Scan``, so an exported model runs any window length and
batch. Used only under a tracer (in eager, ``scan`` would trace its body on every call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moglstm.nn.backends.base import Backend
from moglstm.nn.backends.reference import step
from moglstm.nn.direction import Direction, Steps


class Scan(Backend):
    name = "scan"

    def run(
        self,
        steps: Steps,
        h: Tensor,
        c: Tensor,
        d: Direction,
        reverse: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from torch._higher_order_ops.scan import scan  # a prototype API of torch's

        if steps.batch_sizes is not None:
            raise ValueError("the scan backend does not take packed sequences")

        def body(carry: tuple[Tensor, Tensor], x_t: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
            h, c = step(d, x_t, *carry, mask)
            return (h, c), h.clone()  # scan's outputs may not alias its carry

        # fresh tensors, not views: scan traces its operands' bases too, and sizes of a
        # base that happen to equal the batch tie the batch to a constant
        h, c, x = h.clone(), c.clone(), steps.x.clone(memory_format=torch.contiguous_format)
        (h_n, c_n), out = scan(body, (h, c), x, reverse=reverse)
        return out, h_n, c_n
