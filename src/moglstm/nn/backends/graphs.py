"""CUDA-graph capture of a window's launches, for the Triton backend.

A window of the Triton backend is a few thousand short kernel launches (7 per step and
layer forward, about 13 backward); launched one by one from Python they cost far more than
their arithmetic. :class:`GraphCache` captures the whole window once per key (shapes,
dtype, variant, device, which optional inputs are present) in one graph and replays it
on later calls:

- the first call of a key runs eagerly (it compiles the kernels, and a shape seen once,
  such as an epoch's last short window, is never captured); the second captures and
  replays; later calls replay.
- the graph reads its inputs from and writes its outputs to fixed addresses: every call
  copies its inputs (the weights included, so in-place optimiser updates, new weight
  storage after ``load_state_dict`` or ``.to()``, and autocast's per-call casts are all
  seen: nothing can go stale) into the key's static buffers, replays, and returns copies
  of the outputs (the next replay overwrites them; two layers of equal shapes share one
  key).
- a capture that fails (a driver, an op that cannot be captured) warns once and that key
  runs eagerly from then on; so do new keys after ``max_captures`` captures.
  :func:`set_enabled` turns capture off (and frees the graphs), as does
  ``MOGLSTM_CUDA_GRAPHS=0`` in the environment.

The graph object is injected (``make_graph``): :class:`CudaGraph` on a GPU; the tests
inject a stand-in that re-runs the function, so the keying, the buffer copies and the
fallback are tested on CPU.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

Inputs = Sequence[Tensor | None]


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls :class:`GraphCache` makes."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Record ``fn``'s launches (they do not run) and return its outputs, tensors in
        the graph's own memory pool that every replay overwrites."""
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class Entry:
    """One captured key: its graph, static inputs and the outputs the graph writes."""

    def __init__(self, graph, inputs: list[Tensor | None], outputs: Any) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


def _static(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _fill(static: list[Tensor | None], inputs: Inputs) -> None:
    for s, t in zip(static, inputs, strict=True):
        if s is not None:
            s.copy_(t)


def _copy_out(outputs: Any) -> Any:
    """Fresh copies of a nest of tensors (tuples, lists; None kept)."""
    if isinstance(outputs, Tensor):
        return outputs.clone()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_copy_out(o) for o in outputs)
    return outputs


class GraphCache:
    """Captured windows by key, least recently used dropped past ``max_entries``.

    ``devices``: the device types whose calls are captured (``("cuda",)``; the tests add
    ``"cpu"`` with a stand-in graph). After ``max_captures`` captures (shapes that keep
    changing, e.g. windows of random length, would otherwise evict and recapture each
    other, each capture costing about what a few eager windows do) new keys run eagerly,
    with one warning. ``captures`` counts the captures made, ``replays`` the replays, for
    tests and benchmarks.
    """

    def __init__(
        self,
        make_graph: Callable[[], Any] = CudaGraph,
        devices: tuple[str, ...] = ("cuda",),
        max_entries: int = 16,
        max_captures: int = 64,
    ) -> None:
        self.make_graph, self.devices, self.max_entries = make_graph, devices, max_entries
        self.max_captures = max_captures
        self.entries: OrderedDict[Hashable, Entry | None] = OrderedDict()  # None: eager
        self.seen: set[Hashable] = set()
        self.captures = self.replays = 0
        self.warned = False

    def applies(self, x: Tensor) -> bool:
        """Whether a call on tensors like ``x`` goes through the cache: capture on, a
        device it captures on, and no capture or tracing already under way (an outer CUDA
        graph, e.g. ``torch.compile(mode="reduce-overhead")``, records the launches
        itself)."""
        if not ENABLED or x.device.type not in self.devices or torch.compiler.is_compiling():
            return False
        return not (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def run(self, key: Hashable, inputs: Inputs, fn: Callable[[Inputs], Any]) -> Any:
        """``fn(inputs)`` (a nest of tensors), by replaying the graph of ``key`` if there is
        one. ``fn`` must launch the same work for any inputs of the key's shapes, read only
        ``inputs`` and what it allocates, and return what it allocated."""
        entry = self.entries.get(key, False)
        if entry is None:  # its capture failed: eager
            return fn(inputs)
        if entry is False:
            if key not in self.seen:  # first sighting: eager (compiles the kernels)
                self.seen.add(key)
                return fn(inputs)
            if self.captures >= self.max_captures:
                self._warn_once(
                    f"more than {self.max_captures} window shapes were captured; new shapes "
                    "run with eager launches"
                )
                return fn(inputs)
            entry = self._capture(key, inputs, fn)
            if entry is None:
                return fn(inputs)
        else:
            self.entries.move_to_end(key)
        _fill(entry.inputs, inputs)
        entry.graph.replay()
        self.replays += 1
        return _copy_out(entry.outputs)

    def _capture(self, key: Hashable, inputs: Inputs, fn) -> Entry | None:
        static = [_static(t) for t in inputs]
        _fill(static, inputs)
        try:
            graph = self.make_graph()
            outputs = graph.capture(lambda: fn(static))
        except Exception as err:  # a driver or an op that cannot be captured: eager
            self.entries[key] = None
            self._warn_once(
                f"CUDA-graph capture of a Triton window failed ({type(err).__name__}: "
                f"{err}); that shape runs with eager launches"
            )
            return None
        self.captures += 1
        entry = self.entries[key] = Entry(graph, static, outputs)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def _warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"moglstm: {message}", RuntimeWarning, stacklevel=5)

    def clear(self) -> None:
        """Drop every graph (and its memory) and what was seen."""
        self.entries.clear()
        self.seen.clear()


ENABLED = os.environ.get("MOGLSTM_CUDA_GRAPHS", "1") not in ("0", "false", "off", "")
GRAPHS = GraphCache()


def set_enabled(enabled: bool) -> bool:
    """Turn CUDA-graph capture of the Triton backend's windows on or off (off frees every
    captured graph); returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(enabled)
    if not enabled:
        GRAPHS.clear()
    return previous


def enabled() -> bool:
    return ENABLED
