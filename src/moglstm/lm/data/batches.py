"""Cutting token ids into truncated-BPTT batches: streams, windows, a resumable stream."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from moglstm.lm.arguments import check_int
from moglstm.lm.errors import UserError

__all__ = ["BatchStream", "batchify", "iter_windows"]


def _check_ids(name: str, ids: object, dim: int) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dim() != dim or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise ValueError(
            f"{name} must be a {dim}-D integer tensor, got shape {tuple(ids.shape)} {ids.dtype}"
        )
    return ids


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D stream of ids into ``batch_size`` contiguous streams, time-major.

    Stream ``b`` is ``ids[b*N:(b+1)*N]``; the ``len(ids) % batch_size`` trailing tokens
    are dropped.

    Args:
        ids: shape ``(L,)``, integer dtype.
        batch_size: number of parallel streams ``B``.

    Returns:
        A contiguous tensor of shape ``(N, B)`` with ``N = L // B``, on ``ids``'s device.
    """
    ids = _check_ids("ids", ids, 1)
    check_int("batch_size", batch_size, 1)
    n = ids.numel() // batch_size
    if n < 2:
        raise UserError(
            f"corpus too small: {ids.numel()} tokens give {n} per stream with "
            f"batch_size={batch_size}; need at least 2 (an input and its target)"
        )
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def iter_windows(
    data: Tensor, bptt: int, *, max_tokens: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(inputs, targets)`` windows of a batchified split, for evaluation.

    Windows are ``bptt`` steps long except possibly the last; ``targets`` is
    ``inputs`` shifted one step ahead. Carry the model state from one window to the
    next (detached) to score the stream as one long sequence.

    Args:
        data: shape ``(N, B)`` from :func:`batchify`.
        bptt: window length ``T``.
        max_tokens: stop after about this many target tokens (whole rows of ``B``);
            ``None`` scores the whole split.

    Yields:
        ``inputs`` and ``targets``, each shape ``(T, B)``.
    """
    data = _check_ids("data", data, 2)
    check_int("bptt", bptt, 1)
    end = data.size(0) - 1  # last row has no target
    if max_tokens is not None:
        check_int("max_tokens", max_tokens, 1)
        end = min(end, -(-max_tokens // data.size(1)))
    for pos in range(0, end, bptt):
        length = min(bptt, end - pos)
        yield data[pos : pos + length], data[pos + 1 : pos + 1 + length]


class BatchStream:
    r"""An endless, resumable stream of truncated-BPTT training windows.

    Walks a batchified split ``(N, B)`` front to back in windows and wraps around at
    the end. Use it with a recurrent model like so::

        stream = BatchStream(batchify(corpus.train, 64), bptt=70, seed=1)
        for step in range(max_steps):
            inputs, targets, new_epoch = stream.next()   # (T, B) each
            if new_epoch:
                state = None                      # the streams restart at their beginning
            logits, state = model(inputs, state)
            state = detach(state)                 # carry state, but not its graph
        ckpt["stream"] = stream.state_dict()      # resume exactly here later

    With ``variable_length`` (AWD-LSTM style), each window's length ``T`` is drawn:
    base ``bptt`` with probability 0.95, else ``bptt / 2``; ``T = max(5, int(N(base,
    5)))``, capped at ``max_length``. The trainer may scale its learning rate by
    ``T / bptt``. Draws use a private :class:`torch.Generator` seeded from ``seed`` and
    saved in :meth:`state_dict`, so a resumed run sees the same windows.

    Args:
        data: shape ``(N, B)``, from :func:`batchify` (on the device you train on).
        bptt: the (base) window length.
        variable_length: draw window lengths as above.
        seed: seed of the length generator.
        max_length: cap on a drawn length; default ``bptt + 20``.
    """

    def __init__(
        self,
        data: Tensor,
        bptt: int,
        *,
        variable_length: bool = False,
        seed: int = 0,
        max_length: int | None = None,
    ) -> None:
        self.data = _check_ids("data", data, 2)
        self.bptt = check_int("bptt", bptt, 1)
        self.max_length = check_int(
            "max_length", bptt + 20 if max_length is None else max_length, bptt
        )
        if data.size(0) < bptt + 1:
            raise UserError(
                f"corpus too small: {data.size(0)} steps per stream (batch of {data.size(1)}"
                f" streams, {data.numel()} tokens) but bptt={bptt} needs at least {bptt + 1};"
                " lower batch_size or bptt"
            )
        self.variable_length = bool(variable_length)
        self.seed = check_int("seed", seed, -(2**63))
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # row of the next window's first input
        self.epoch = 0  # completed passes

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor, bool]:
        return self.next()

    @property
    def steps(self) -> int:
        """Number of time steps ``N`` per stream."""
        return self.data.size(0)

    def _length(self) -> int:
        if not self.variable_length:
            return self.bptt
        base = self.bptt if torch.rand((), generator=self.generator) < 0.95 else self.bptt / 2
        drawn = int(base + 5.0 * torch.randn((), generator=self.generator).item())
        return min(max(min(5, self.bptt), drawn), self.max_length)

    def next(self) -> tuple[Tensor, Tensor, bool]:
        """Return the next window.

        Returns:
            ``inputs`` ``(T, B)``, ``targets`` ``(T, B)`` (inputs one step ahead) and
            ``new_epoch``: ``True`` on the first window of every pass over the data
            (including the very first), when the model state should be reset.
        """
        new_epoch = self.position == 0
        pos = self.position
        length = min(self._length(), self.steps - 1 - pos)
        self.position = pos + length
        if self.position >= self.steps - 1:
            self.position, self.epoch = 0, self.epoch + 1
        return self.data[pos : pos + length], self.data[pos + 1 : pos + 1 + length], new_epoch

    def state_dict(self) -> dict[str, Any]:
        """Position, epoch and generator state (plain ints and a ``uint8`` tensor)."""
        return {
            "position": self.position,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` so the stream continues where it stopped (a state
        that does not fit this stream, read from a checkpoint, is a UserError)."""
        missing = {"position", "epoch", "generator"} - set(state)
        if missing:
            raise UserError(f"stream state lacks {sorted(missing)}")
        position = check_int("position", state["position"], 0)
        if position >= self.steps - 1:
            raise UserError(
                f"position {position} is past the end of this split ({self.steps} steps);"
                " was the state saved for another batch size?"
            )
        gen = state["generator"]
        if not isinstance(gen, Tensor) or gen.dtype != torch.uint8:
            raise UserError("generator state must be a uint8 tensor")
        self.generator.set_state(gen.cpu())
        self.position = position
        self.epoch = check_int("epoch", state["epoch"], 0)
