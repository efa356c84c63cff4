"""The multi-layer Mogrifier LSTM, with the ``torch.nn.LSTM`` contract."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from moglstm.nn import backends
from moglstm.nn._checks import (
    check_floating,
    check_like,
    check_positive_int,
    check_probability,
    check_proj_size,
    check_rank,
    check_rounds,
    check_shape,
    check_tensor,
)
from moglstm.nn.backends import IMPLEMENTATIONS
from moglstm.nn.cell import check_variants, lstm_parameter_shapes
from moglstm.nn.direction import Direction, Steps
from moglstm.nn.mogrifier import Mogrifier

__all__ = ["IMPLEMENTATIONS", "MogrifierLSTM", "Steps"]


def autocast_dtype(input: object) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``input``'s device, else None (also for
    float64 input, which autocast leaves alone)."""
    x = input.data if isinstance(input, PackedSequence) else input
    if not isinstance(x, Tensor) or not torch.is_floating_point(x) or x.dtype == torch.float64:
        return None
    device = x.device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class MogrifierLSTM(nn.Module):
    r"""A multi-layer Mogrifier LSTM, a drop-in for :class:`torch.nn.LSTM`.

    Each layer runs :class:`MogrifierLSTMCell`'s step over the sequence: before
    step :math:`t`, the layer input :math:`x_t` and :math:`h_{t-1}` gate each other
    for ``mogrify_rounds`` rounds (see :class:`Mogrifier`); the gated pair feeds the
    LSTM gates and the ordinary :math:`(h_t, c_t)` is carried on. Layer
    :math:`l > 0` takes the outputs of layer :math:`l-1` (both directions
    concatenated), with dropout in between when ``dropout > 0``.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as in :class:`torch.nn.LSTM`.
        mogrify_rounds: Mogrifier rounds per step; 0 gives a plain LSTM.
        mogrify_rank: rank of the round matrices (``None``: full rank).
        coupled, peephole, cap_input_gate: the cell variants of :class:`MogrifierLSTMCell`.
        state_dropout: variational dropout on the :math:`h_{t-1}` fed back into each
            step (one mask per layer, direction and call, in training mode only). It
            does not touch the outputs or the returned state.
        proj_size: as in :class:`torch.nn.LSTM`: if ``> 0``, each step's output is
            projected, :math:`h_t = W_{hr} (o_t \odot \tanh(c_t))` with ``weight_hr_l{k}``
            of shape ``(proj_size, hidden_size)``; ``h`` (fed back, gated by the
            Mogrifier, output and returned) has ``proj_size`` features, ``c`` keeps
            ``hidden_size``. Runs on the reference path (``"fused"`` refuses it).
        implementation: ``"auto"`` (default) runs each layer direction as one fused
            autograd node (a backend of :mod:`moglstm.nn.backends`, picked once per call
            by :func:`moglstm.nn.backends.select`) when autograd records the call and
            the input is unpacked: on CUDA the Triton kernels once they pass their
            self-check (float32, float16, bfloat16; else the torch-ops step loop), on
            CPU the compiled step loop (float32/float64); in inference too for windows
            of 8 steps or more with one of those two; the reference step loop
            otherwise (short inference calls, packed sequences, other dtypes);
            ``"reference"`` always runs :mod:`moglstm.nn.functional` step by step;
            ``"fused"`` insists on a fused backend (except under ``torch.func``
            transforms and forward-mode AD, where it runs the reference as ``"auto"``
            does); ``"triton"`` on the Triton one (CUDA, or CPU under
            ``TRITON_INTERPRET=1``; see docs/gpu.md). All give the same outputs and
            gradients, first and second: a fused backward with ``create_graph=True``
            recomputes the window with the reference
            (:mod:`moglstm.nn.backends.recompute`), and a second backward through a
            retained graph reruns the fused forward, so it gives the same bits.
            ``torch.jit.trace`` is refused (a trace would fix the window length).

    Parameters follow :class:`torch.nn.LSTM`: ``weight_ih_l{k}``, ``weight_hh_l{k}``,
    ``bias_ih_l{k}``, ``bias_hh_l{k}``, ``weight_hr_l{k}``, with ``_reverse`` for the
    backward direction (plus ``weight_c{i,f,o}_l{k}`` for peepholes); the Mogrifier of
    each layer and direction is the submodule ``mogrifier_l{k}`` /
    ``mogrifier_l{k}_reverse``. So ``load_state_dict(torch_lstm.state_dict())`` works
    (``proj_size`` included), with ``strict=False`` when there are Mogrifier or
    peephole parameters too. ``all_weights``, ``_flat_weights``,
    ``_flat_weights_names`` and ``mode`` are there for code written against
    :class:`torch.nn.LSTM` (the LSTM's weights only; the Mogrifiers' are in their
    submodules). It is not a subclass of :class:`torch.nn.LSTM`. ``docs/interop.md`` says
    what works with torch.compile, torch.export, ONNX, torch.func, autocast and the rest.

    Inputs: ``input, hx``
        - input: ``(L, H_in)`` unbatched, ``(L, N, H_in)``, ``(N, L, H_in)`` with
          ``batch_first=True``, or a :class:`~torch.nn.utils.rnn.PackedSequence`.
          Padding of a packed sequence never affects any result.
        - hx: ``None`` (zeros) or ``(h_0, c_0)``, each ``(D * num_layers, N, H)``
          (``(D * num_layers, H)`` unbatched), ``D = 2`` if bidirectional else 1;
          with ``proj_size > 0``, ``h_0`` has ``proj_size`` features instead of ``H``.

    Outputs: ``output, (h_n, c_n)``
        - output: ``(L, N, D * H)`` (``D * proj_size`` with a projection; batch first if
          asked), or a ``PackedSequence``.
        - h_n, c_n: ``(D * num_layers, N, H)``; for packed input, each sequence's
          state after its own last step.

    Example::

        >>> rnn = MogrifierLSTM(10, 20, num_layers=2, mogrify_rounds=5, mogrify_rank=4)
        >>> x = torch.randn(5, 3, 10)
        >>> output, (h_n, c_n) = rnn(x)
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        mogrify_rounds: int = 5,
        mogrify_rank: int | None = None,
        coupled: bool = False,
        peephole: bool = False,
        cap_input_gate: bool = False,
        state_dropout: float = 0.0,
        proj_size: int = 0,
        implementation: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_variants(coupled, cap_input_gate)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.implementation = implementation
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_layers = check_positive_int("num_layers", num_layers)
        self.dropout = check_probability("dropout", dropout)
        self.state_dropout = check_probability("state_dropout", state_dropout)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.coupled = bool(coupled)
        self.peephole = bool(peephole)
        self.cap_input_gate = bool(cap_input_gate)
        self.mogrify_rounds = check_rounds("mogrify_rounds", mogrify_rounds)
        self.mogrify_rank = mogrify_rank
        self.proj_size = check_proj_size(proj_size, hidden_size)
        out_size = self.proj_size or hidden_size  # the h carried, fed back and output
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            shapes = self._lstm_shapes(layer)
            layer_input = shapes["weight_ih"][1]
            check_rank("mogrify_rank", mogrify_rank, layer_input, out_size)
            for suffix in self._suffixes(layer):
                mog = Mogrifier(layer_input, out_size, mogrify_rounds, mogrify_rank, **factory)
                self.add_module(f"mogrifier{suffix}", mog)
                for name, shape in shapes.items():
                    self.register_parameter(
                        f"{name}{suffix}", nn.Parameter(torch.empty(shape, **factory))
                    )
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _lstm_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Names (no suffix) and shapes of layer ``layer``'s LSTM parameters."""
        out_size = self.proj_size or self.hidden_size
        layer_input = self.input_size if layer == 0 else out_size * self.num_directions
        return lstm_parameter_shapes(
            layer_input, self.hidden_size, self.bias, self.coupled, self.peephole, self.proj_size
        )

    # -- torch.nn.LSTM's attributes, for code written against it

    mode = "LSTM"

    @property
    def _all_weights(self) -> list[list[str]]:
        """Per layer and direction, the LSTM parameters' names in torch.nn.LSTM's order
        (``weight_ih, weight_hh, bias_ih, bias_hh, weight_hr``), then the peepholes'.
        The Mogrifiers' parameters are in the ``mogrifier_l{k}`` submodules."""
        return [
            [f"{name}{suffix}" for name in self._lstm_shapes(layer)]
            for layer in range(self.num_layers)
            for suffix in self._suffixes(layer)
        ]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The tensors named by ``_flat_weights_names``, read at every call: the module
        always runs on its current attributes (assign ``weight_hh_l0``, not this list)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def reset_parameters(self) -> None:
        """torch's LSTM scheme, U(-1/sqrt(H), 1/sqrt(H)), for the LSTM weights; the
        Mogrifiers reset themselves (see :class:`Mogrifier`)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters(recurse=False):
            nn.init.uniform_(p, -bound, bound)
        for module in self.children():
            module.reset_parameters()

    def flatten_parameters(self) -> None:
        """No-op, for code written against :class:`torch.nn.LSTM`."""

    def direction(self, layer: int, direction: int, dtype: torch.dtype | None = None) -> Direction:
        """Layer ``layer``'s weights and variant flags in direction ``direction`` (0, 1),
        cast (differentiably) to ``dtype`` if given."""
        suffix = self._suffixes(layer)[direction]
        mog: Mogrifier = getattr(self, f"mogrifier{suffix}")

        def get(name: str) -> Tensor | None:
            t = getattr(self, f"{name}{suffix}", None)
            return t if t is None or dtype is None else t.to(dtype)

        def cast(t: Any) -> Any:  # a tensor, a tuple of tensors or None
            if dtype is None or t is None:
                return t
            return tuple(w.to(dtype) for w in t) if isinstance(t, tuple) else t.to(dtype)

        peephole = tuple(get(f"weight_c{g}") for g in "ifo") if self.peephole else None
        return Direction.build(
            [cast(w) for w in mog.round_weights()],
            [cast(b) for b in mog.round_biases()],
            get("weight_ih"),
            get("weight_hh"),
            get("bias_ih"),
            get("bias_hh"),
            peephole,
            coupled=self.coupled,
            cap_input_gate=self.cap_input_gate,
            weight_hr=get("weight_hr"),
        )

    def forward(
        self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        amp = autocast_dtype(input)
        if amp is None:
            return self._forward(input, hx, None)
        # as torch.nn.LSTM under autocast: input, state and weights cast to the autocast
        # dtype and the layer run in it, with autocast off inside (the fused node's
        # backward also runs with autocast off: custom_fwd/custom_bwd semantics)
        device = (input.data if isinstance(input, PackedSequence) else input).device.type
        with torch.autocast(device, enabled=False):
            if isinstance(input, PackedSequence):
                input = input._replace(data=input.data.to(amp))
            else:
                input = input.to(amp)
            if isinstance(hx, (tuple, list)):
                hx = tuple(v.to(amp) if isinstance(v, Tensor) else v for v in hx)
            return self._forward(input, hx, amp)

    def _forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None,
        amp: torch.dtype | None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        steps, batch, unbatched, packed = self._unpack_input(input, amp)
        order = input.sorted_indices if packed else None
        h0, c0 = self._initial_state(steps.x, hx, batch, unbatched, order)
        backend = self.backend_for(steps)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                steps = Steps(nn.functional.dropout(steps.x, self.dropout, True), steps.batch_sizes)
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                mask = self._state_mask(h0[k])
                w = self.direction(layer, d, amp)
                out, h, c = backend.run(steps, h0[k], c0[k], w, d == 1, mask)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            steps = Steps(torch.cat(outs, -1) if len(outs) > 1 else outs[0], steps.batch_sizes)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        return self._pack_output(steps.x, h_n, c_n, input, unbatched)

    def _state_mask(self, h: Tensor) -> Tensor | None:
        """A fresh state-dropout mask (scaled by 1/keep) in training mode, else None."""
        if self.state_dropout == 0 or not self.training:
            return None
        keep = 1.0 - self.state_dropout
        return torch.empty_like(h).bernoulli_(keep) / keep

    def backend_for(self, steps: Steps) -> backends.Backend:
        """The backend that runs every layer direction of a call on ``steps`` (see
        :func:`moglstm.nn.backends.select`)."""
        records_grad = self._records_grad(steps.x)
        return backends.select(self.implementation, steps, records_grad, self.proj_size)

    def _records_grad(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _unpack_input(
        self, input: Tensor | PackedSequence, amp: torch.dtype | None = None
    ) -> tuple[Steps, int, bool, bool]:
        """Return ``(Steps, batch, unbatched, packed)`` with time-major data."""
        if isinstance(input, PackedSequence):
            x = input.data
            self._check_features(x, "input.data", amp)
            sizes = input.batch_sizes.tolist()
            return Steps(x, sizes), sizes[0], False, True
        check_tensor("input", input)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 2-D (unbatched) or 3-D (batched), got shape {tuple(input.shape)}"
            )
        self._check_features(input, "input", amp)
        length = input.shape[1 if self.batch_first and input.dim() == 3 else 0]
        if length == 0:  # as torch.nn.LSTM: an RNN over no steps has no final state to give
            raise ValueError(
                f"input must have a sequence length > 0, got shape {tuple(input.shape)}"
            )
        if input.dim() == 2:
            return Steps(input.unsqueeze(1), None), 1, True, False
        x = input.transpose(0, 1) if self.batch_first else input
        return Steps(x, None), x.shape[1], False, False

    def _check_features(self, x: Tensor, name: str, amp: torch.dtype | None) -> None:
        check_floating(name, x)
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{name} must have {self.input_size} features (input_size), "
                f"got shape {tuple(x.shape)}"
            )
        weight = self.weight_ih_l0
        check_like(
            name, x, weight if amp is None else weight.new_empty(0, dtype=amp), "weight_ih_l0"
        )

    def _initial_state(
        self,
        x: Tensor,
        hx: Any,
        batch: int,
        unbatched: bool,
        order: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        layers = self.num_layers * self.num_directions
        sizes = (self.proj_size or self.hidden_size, self.hidden_size)  # of h and c
        if hx is None:
            return tuple(x.new_zeros(layers, batch, n) for n in sizes)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be None or a pair (h_0, c_0), got {type(hx).__name__}")
        for name, v, n in zip(("hx[0]", "hx[1]"), hx, sizes, strict=True):
            check_tensor(name, v)
            check_shape(name, v, (layers, n) if unbatched else (layers, batch, n))
            check_like(name, v, x, "input")
        h0, c0 = hx
        if unbatched:
            return h0.unsqueeze(1), c0.unsqueeze(1)
        if order is not None:  # packed input: states follow the sorted batch
            return h0.index_select(1, order), c0.index_select(1, order)
        return h0, c0

    def _pack_output(
        self,
        out: Tensor,
        h_n: Tensor,
        c_n: Tensor,
        input: Tensor | PackedSequence,
        unbatched: bool,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        if isinstance(input, PackedSequence):
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
                c_n = c_n.index_select(1, input.unsorted_indices)
            packed = PackedSequence(
                out, input.batch_sizes, input.sorted_indices, input.unsorted_indices
            )
            return packed, (h_n, c_n)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name in ("batch_first", "bidirectional", "coupled", "peephole", "cap_input_gate"):
            if getattr(self, name):
                s += f", {name}=True"
        for name in ("dropout", "state_dropout"):
            if getattr(self, name):
                s += f", {name}={getattr(self, name)}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if not self.bias:
            s += ", bias=False"
        return s
