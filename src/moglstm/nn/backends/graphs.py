"""CUDA-graph capture of a window's launches, for the Triton backend.

A window of the Triton backend is a few thousand short kernel launches (6 per step and
layer forward, 7 backward, for 5 rounds); launched one by one from Python they cost far more than
their arithmetic. :class:`GraphCache` captures the whole window once per key (the
variant; each input's shape, dtype and device, or its absence) in one graph and replays it
on later calls:

- the first call of a key runs eagerly (it compiles the kernels, and a shape seen once,
  such as an epoch's last short window, is never captured); the second captures and
  replays; later calls replay.
- the graph reads its inputs from and writes its outputs to fixed addresses: every call
  copies its inputs (the weights included, so in-place optimiser updates, new weight
  storage after ``load_state_dict`` or ``.to()``, and autocast's per-call casts are all
  seen: nothing can go stale) into the key's static buffers, replays, and returns copies
  of the outputs, which the next replay overwrites. The large ones (a forward's window
  buffers, kept for backward) are *lent* instead: handed out as views, the graph is not
  replayed while one lives (its storage's reference count says so), a second graph of
  the key (a *slot*) serves the call meanwhile (two layers of equal shapes, two windows
  before one backward), and the backward's graph reads them where they are.
- a capture that fails (a driver, an op that cannot be captured) warns once and that key
  runs eagerly from then on; so do new keys after ``max_captures`` captures.
  :func:`set_enabled` turns capture off (and frees the graphs), as does
  ``MOGLSTM_CUDA_GRAPHS=0`` in the environment.
- one lock serialises the cache's bookkeeping, fills, replays and copies across threads;
  a call on another stream than the last call's first waits for it; the graph's buffers
  are made outside inference mode (a training call fills them after an evaluation).

The graph object is injected (``make_graph``): :class:`CudaGraph` on a GPU; the tests
inject a stand-in that re-runs the function, so the keying, the buffer copies and the
fallback are tested on CPU.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

Inputs = Sequence[Tensor | None]


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the calls :class:`GraphCache` makes."""

    # per device, the stream of the last call through the cache: a call on another stream
    # first waits for it (the static inputs, the outputs being copied out and the lent
    # buffers a backward reads are shared by every stream)
    last_stream: dict[int, Any] = {}

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[Inputs], Any], inputs: Inputs, warmup: Inputs) -> Any:
        """Record the launches of ``fn(inputs)`` (they do not run) and return its outputs,
        tensors in the graph's own memory pool that every replay overwrites.

        ``fn(warmup)`` runs first on a side stream, as torch advises: Triton compiles a
        kernel for each alignment of its pointers, and the static buffers' may differ
        from the eager call's; compiling inside a capture could fail."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(warmup)
        torch.cuda.current_stream().wait_stream(stream)
        # captured on the same side stream, of x's device (torch's default capture stream
        # is made once, on whichever device was current first); thread_local: CUDA calls
        # of other threads (a DataLoader's pinning thread) are not refused meanwhile
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            return fn(inputs)

    def prepare(self) -> None:
        """Called before the static inputs are filled: :meth:`order`."""
        CudaGraph.order()

    @staticmethod
    def order() -> None:
        """Order the current stream after the stream of the previous call through the
        cache on this device, if that was another (every call, eager ones too: an eager
        backward reads and overwrites a forward graph's lent buffers)."""
        now = torch.cuda.current_stream()
        before = CudaGraph.last_stream.get(now.device_index)
        if before is not None and before != now:
            now.wait_stream(before)
        CudaGraph.last_stream[now.device_index] = now

    def replay(self) -> None:
        self.graph.replay()


class Entry:
    """One captured key: its graph, static inputs (``fixed`` ones are the caller's own),
    the outputs the graph writes, which of them are lent out (``lend``) and how many
    references their storage had when nothing was lent (``base``)."""

    def __init__(
        self,
        graph: Any,
        inputs: list[Tensor | None],
        outputs: Any,
        fixed: Sequence[int] = (),
        lend: Sequence[int] = (),
    ) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        self.fixed, self.lend = fixed, lend
        self.base = [_uses(outputs[i]) for i in lend]

    def held(self) -> bool:
        """Whether a view lent out by the last replay is still alive (a pending backward
        keeps the forward's window buffers: replaying would overwrite them)."""
        return any(_uses(self.outputs[i]) > n for i, n in zip(self.lend, self.base, strict=True))


def _uses(t: Tensor) -> int:
    """References to ``t``'s storage (tensors viewing it)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# lending needs the storage's reference count (torch's own CUDA-graph trees read it the same
# way); without it every output is copied
LENDING = hasattr(torch._C, "_storage_Use_Count")


_EAGER = object()  # GraphCache._run's answer: run fn on the caller's inputs


def signature(inputs: Inputs) -> tuple:
    """Shape, dtype and device of each input (None for an absent one), for keys."""
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)


def _static(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _fill(static: list[Tensor | None], inputs: Inputs, fixed: Sequence[int] = ()) -> None:
    for i, (s, t) in enumerate(zip(static, inputs, strict=True)):
        if s is not None and i not in fixed:
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
        max_slots: int = 4,
    ) -> None:
        self.make_graph, self.devices, self.max_entries = make_graph, devices, max_entries
        self.max_captures, self.max_slots = max_captures, max_slots
        self.entries: OrderedDict[Hashable, Entry | None] = OrderedDict()  # None: eager
        self.seen: set[Hashable] = set()
        self.captures = self.replays = 0
        self.warned = False
        self.lock = threading.RLock()

    def applies(self, x: Tensor) -> bool:
        """Whether a call on tensors like ``x`` goes through the cache: capture on, a
        device it captures on, and no capture or tracing already under way (an outer CUDA
        graph, e.g. ``torch.compile(mode="reduce-overhead")``, records the launches
        itself)."""
        if not ENABLED or x.device.type not in self.devices or torch.compiler.is_compiling():
            return False
        return not (x.is_cuda and torch.cuda.is_current_stream_capturing())

    def run(
        self,
        key: Hashable,
        inputs: Inputs,
        fn: Callable[[Inputs], Any],
        *,
        fixed: tuple[int, ...] = (),
        lend: tuple[int, ...] = (),
    ) -> Any:
        """``fn(inputs)`` (a nest of tensors), by replaying the graph of ``key`` if there is
        one. ``fn`` must launch the same work for any inputs of the key's shapes, read only
        ``inputs`` and what it allocates, and return what it allocated.

        ``fixed``: indices of inputs the graph reads where they are, never copied (the key
        must name their addresses). ``lend``: indices of outputs (``fn`` then returns a
        list) handed out as views of the graph's own buffers instead of copies; while
        such a view lives the key's graph is not replayed: the call takes the next slot,
        ``(key, 1)`` and on (its own graph), up to ``max_slots``, else runs eagerly.

        The key must fix every input's shape, dtype and device (:func:`signature`): a
        static buffer of another dtype or shape would cast or broadcast silently. Calls
        from several threads are serialised (between filling the static inputs and
        copying the outputs out no other call may touch them); eager calls run outside
        the lock."""
        with self.lock:
            result = self._locked_run(key, inputs, fn, fixed, lend)
            if result is _EAGER and any(t is not None and t.is_cuda for t in inputs):
                CudaGraph.order()
        return fn(inputs) if result is _EAGER else result

    def _locked_run(
        self,
        key: Hashable,
        inputs: Inputs,
        fn: Callable[[Inputs], Any],
        fixed: Sequence[int],
        lend: Sequence[int],
    ) -> Any:
        if not lend or not LENDING:  # without LENDING no way to tell if a buffer is held
            return self._run(key, inputs, fn, fixed, ())
        for slot in range(self.max_slots):
            entry = self.entries.get((key, slot))
            if not (isinstance(entry, Entry) and entry.held()):
                return self._run((key, slot), inputs, fn, fixed, lend)
        return _EAGER  # every slot's buffers are held

    def lender(self, t: Tensor) -> tuple[list[Tensor | None], Tensor] | None:
        """``(static inputs, buffer)`` of the graph whose buffer ``t`` is a lent view of (the
        buffer itself, so that the caller can hand it to another graph as a ``fixed``
        input), or None. While the buffer is held that graph is not replayed, so its static inputs
        still hold what the lending call was given: another graph may read them in place
        (as ``fixed`` inputs) instead of copying the same values again."""
        with self.lock:
            for entry in self.entries.values():
                for i in entry.lend if entry is not None else ():
                    out = entry.outputs[i]
                    if out.data_ptr() == t.data_ptr() and out.shape == t.shape:
                        return entry.inputs, out
        return None

    def _run(
        self,
        key: Hashable,
        inputs: Inputs,
        fn: Callable[[Inputs], Any],
        fixed: Sequence[int],
        lend: Sequence[int],
    ) -> Any:
        entry = self.entries.get(key, False)
        if entry is None:  # its capture failed: eager
            return _EAGER
        if entry is False:
            if key not in self.seen:  # first sighting: eager (compiles the kernels)
                self.seen.add(key)
                return _EAGER
            if self.captures >= self.max_captures:
                self._warn_once(
                    f"more than {self.max_captures} window shapes were captured; new shapes "
                    "run with eager launches"
                )
                return _EAGER
            entry = self._capture(key, inputs, fn, fixed, lend)
            if entry is None:
                return _EAGER
        else:
            self.entries.move_to_end(key)
        prepare = getattr(entry.graph, "prepare", None)
        if prepare is not None:
            prepare()
        _fill(entry.inputs, inputs, entry.fixed)
        entry.graph.replay()
        self.replays += 1
        if not entry.lend:
            return _copy_out(entry.outputs)
        return [
            o.view(o.shape) if i in entry.lend else _copy_out(o)
            for i, o in enumerate(entry.outputs)
        ]

    def _capture(
        self,
        key: Hashable,
        inputs: Inputs,
        fn: Callable[[Inputs], Any],
        fixed: Sequence[int],
        lend: Sequence[int],
    ) -> Entry | None:
        # the graph's buffers are normal tensors even when the capturing call runs under
        # inference_mode: a later training call fills them in place and lends them out
        with torch.inference_mode(False), torch.no_grad():
            static = [t if i in fixed else _static(t) for i, t in enumerate(inputs)]
            _fill(static, inputs, fixed)
            try:
                graph = self.make_graph()
                # the warm-up may overwrite its inputs (a backward does): the caller's own
                # (fixed) ones are copied for it
                warmup = [t.clone() if i in fixed else t for i, t in enumerate(static)]
                outputs = graph.capture(fn, static, warmup)
            except Exception as err:  # a driver or an op that cannot be captured: eager
                self.entries[key] = None
                self._warn_once(
                    f"CUDA-graph capture of a Triton window failed ({type(err).__name__}: "
                    f"{err}); that shape runs with eager launches"
                )
                return None
        self.captures += 1
        gc.collect()  # no stray view of a lent buffer may inflate its reference count
        entry = self.entries[key] = Entry(graph, static, outputs, fixed, lend)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def _warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(f"moglstm: {message}", RuntimeWarning, stacklevel=5)

    def clear(self) -> None:
        """Drop every graph (and its memory) and what was seen."""
        with self.lock:
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
