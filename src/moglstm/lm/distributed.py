r"""Data-parallel training with :mod:`torch.distributed`.

``torchrun --nproc_per_node=N -m moglstm train ...`` starts ``N`` processes
("ranks") that train one model with
:class:`~torch.nn.parallel.DistributedDataParallel` (DDP): NCCL on GPUs, gloo on
CPUs. :func:`session` joins the process group that torchrun describes in the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); without torchrun everything here is a no-op and a run is an
ordinary single process.

How the work is split among ``N`` ranks with a global batch of ``B`` streams:

* **Training data.** Every rank batchifies the training split with the *global*
  ``B`` (as one process would) and takes the streams (columns)
  ``[r*B/N, (r+1)*B/N)`` (:func:`shard_streams`). All ranks walk the same windows
  (same position, same window lengths: the length generator is seeded alike), so
  together they see exactly the tokens one process with batch ``B`` sees. ``B``
  must be divisible by ``N``.
* **Loss and gradients.** Each rank's loss is the mean over its ``T * B/N``
  tokens; DDP averages the gradients over ranks, which for equal shares is the
  gradient of the mean over the global batch. The reported training loss is the
  mean of the ranks' losses (:func:`mean_over_ranks`), the same on every rank, so
  all ranks take the same decision on a non-finite loss.
* **Validation.** The evaluation streams are split as evenly as possible over the
  ranks (:func:`shard_eval_streams`); each rank's summed loss and token count are
  gathered and added in rank order (:func:`average_loss`), so every rank gets the
  same result, bit for bit.
* **Files.** Only rank 0 writes: the run lock, config, metrics and checkpoints.
  :func:`run_on_main` runs such work on rank 0 and re-raises its error on every
  rank, so a failure (a full disk, a locked folder) stops all ranks instead of
  leaving them waiting.
* **Random numbers.** The model is built from the same seed on every rank; after
  that, rank ``r`` reseeds its generators from ``(seed, r)`` so dropout masks
  differ between ranks (:func:`seed_rank_generators`). Dropout therefore draws
  different masks than a single process would: with dropout, a run on ``N`` ranks
  follows a statistically equivalent but not identical path.
* **Checkpoints hold global state**: the carried recurrent state gathered to the
  global batch (:func:`gather_state`), the stream position (the same on every
  rank) and the generator states of every rank (:func:`gather_rng`). A run can
  resume on any number of ranks that divides ``B``: each rank takes its columns of
  the state (:func:`scatter_state`) and restores rank ``r``'s generators when the
  checkpoint has them; ranks beyond those saved seed theirs from
  ``(seed, step, r)`` (:func:`restore_rng`).
* **Peers that stop.** Every collective waits at most ``train.dist_timeout``
  seconds (default 300, instead of torch's 30 minutes) for a stalled rank; a
  rank that died or stalled is then reported as one line on each survivor
  (:class:`PeerLostError`, raised by :func:`peer_failures`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import inspect
import os
import pickle
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch import distributed as dist

from moglstm.lm.errors import UserError
from moglstm.lm.runtime import capture_rng_state, resolve_device, restore_rng_state
from moglstm.lm.safety import short_repr
from moglstm.lm.state import map_state

__all__ = [
    "DistContext",
    "PeerLostError",
    "average_loss",
    "barrier",
    "broadcast_object",
    "check_batch_size",
    "env_rank",
    "env_world_size",
    "gather_rng",
    "gather_state",
    "local_token_cap",
    "main_first",
    "mean_over_ranks",
    "peer_failures",
    "rank_seed",
    "restore_rng",
    "run_on_main",
    "scatter_state",
    "seed_rank_generators",
    "session",
    "shard_eval_streams",
    "shard_streams",
    "wrap_model",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job.

    Attributes:
        rank: this process's index, ``0 <= rank < world_size``; rank 0 does all I/O.
        world_size: the number of processes training together.
        local_rank: the index among the processes on this machine (picks the GPU).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes train together (collectives are needed)."""
        return self.world_size > 1


# --------------------------------------------------------------------------- environment


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(
            f"environment variable {name}={short_repr(raw)} is not an integer (torchrun sets it)"
        ) from None


def env_world_size() -> int:
    """``$WORLD_SIZE`` as torchrun sets it; 1 when unset."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """``$RANK`` as torchrun sets it; 0 when unset."""
    return _env_int("RANK", 0)


def _context_from_env(device: str) -> DistContext:
    world, rank = env_world_size(), env_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    if not 0 <= local_rank < local_world:
        raise UserError(f"LOCAL_RANK={local_rank} is not in [0, LOCAL_WORLD_SIZE={local_world})")
    return DistContext(rank, world, local_rank, _rank_device(device, local_rank, local_world))


def _rank_device(spec: str, local_rank: int, local_world: int) -> torch.device:
    """The device of one rank: ``cuda``/``auto`` mean the GPU numbered ``local_rank``."""
    if not isinstance(spec, str):
        raise TypeError(f"train.device: expected a string, got {short_repr(spec)}")
    if spec == "mps":
        raise UserError("train.device='mps' does not support several processes; use cpu")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise UserError(
                f"{local_world} processes on this machine but {count} CUDA device(s): start "
                f"at most {count} (torchrun --nproc_per_node={max(count, 1)}) or use "
                "train.device=cpu"
            )
        return torch.device("cuda", local_rank)
    device = resolve_device(spec)
    if device.type == "cuda" and local_world > 1:
        raise UserError(
            f"train.device={spec!r} names one GPU but {local_world} processes run on this "
            "machine; use train.device=cuda so that each takes the GPU of its LOCAL_RANK"
        )
    return device


def _context_of_group(device: str) -> DistContext:
    """The context of a process group that the caller initialised (and will destroy)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return DistContext(rank, world, local_rank, _rank_device(device, local_rank, local_world))


class PeerLostError(RuntimeError):
    """Another process of the training job died or stopped answering."""


@contextlib.contextmanager
def session(device: str = "auto", timeout: float | None = None) -> Iterator[DistContext]:
    """Join the training job this process belongs to, for the duration of a ``with``.

    * An initialised default process group (the caller's, or one an earlier call
      started) is used as it is.
    * Otherwise, when torchrun started several processes (``WORLD_SIZE > 1``), the
      default process group is initialised from the environment (NCCL on CUDA, gloo
      on CPU). It stays up for later runs in the same process and is destroyed when
      the interpreter exits: tearing a group down and starting another one in the
      same process races with the other ranks in the rendezvous store.
    * Otherwise this is a single process: rank 0 of 1, no collectives.

    Args:
        device: the ``train.device`` setting. With several processes ``auto`` and
            ``cuda`` mean ``cuda:LOCAL_RANK`` (or CPU without CUDA); ``cuda:N`` is
            accepted only with one process per machine; ``mps`` is refused.
        timeout: seconds a collective waits for the other ranks before failing
            (``train.dist_timeout``); ``None`` keeps torch's default (30 minutes).

    Yields:
        The :class:`DistContext` of this process.
    """
    if dist.is_available() and dist.is_initialized():
        yield _context_of_group(device)
        return
    if env_world_size() <= 1:
        yield DistContext(device=resolve_device(device))
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build lacks torch.distributed")
    ctx = _context_from_env(device)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    dist.init_process_group(backend="nccl" if ctx.device.type == "cuda" else "gloo", **kwargs)
    atexit.register(_destroy_group)
    yield ctx


_PEER_FAILURE = re.compile(
    r"connection (closed|reset|refused)|broken pipe|timed out|timeout|socket|peer|"
    r"NCCL (error|communicator)|Gloo|abort",
    re.IGNORECASE,
)


@contextlib.contextmanager
def peer_failures(ctx: DistContext) -> Iterator[None]:
    """Turn a collective that failed because a peer died or stalled into one clear line.

    Inside the ``with``, an error of :mod:`torch.distributed` (a broken connection,
    a collective past the process group's timeout) becomes a :class:`PeerLostError`
    that says so; any other error passes unchanged. A no-op for one process.
    """
    try:
        yield
    except (PeerLostError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not ctx.distributed or not _is_peer_failure(exc):
            raise
        lines = str(exc).strip().splitlines()
        detail = lines[0].strip() if lines else type(exc).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)[:160]  # gloo's source location
        raise PeerLostError(
            f"rank {ctx.rank} of {ctx.world_size}: another process of this job died or "
            f"stopped answering within train.dist_timeout; the run stops ({detail}). "
            "Resume it with --resume from the last checkpoint"
        ) from exc


def _is_peer_failure(exc: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", ())
    return isinstance(exc, dist_error) or (
        isinstance(exc, RuntimeError) and bool(_PEER_FAILURE.search(str(exc)))
    )


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (a no-op for one process)."""
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (pickled over the process group).

    Args:
        obj: the value on rank 0; ignored on the other ranks.
        ctx: this process's context.
    """
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(fn: Callable[[], T], ctx: DistContext) -> T | None:
    """Run ``fn`` on rank 0 only; an error it raises is raised on every rank.

    All ranks must call this at the same point (it synchronises them).

    Args:
        fn: the work, typically file I/O.
        ctx: this process's context.

    Returns:
        ``fn()`` on rank 0, ``None`` on the other ranks.
    """
    if not ctx.distributed:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # shared with the other ranks below, then re-raised
            error = exc
    shared = broadcast_object(_portable(error), ctx)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


def _portable(error: Exception | None) -> Exception | None:
    """``error`` if it pickles (so other ranks can raise it), else a RuntimeError."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    return error


def main_first(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0, then (if it succeeded) on the other ranks.

    For work that fills a shared cache, such as downloading a corpus: rank 0
    fetches it once and the others then find it in place.
    """
    result = run_on_main(fn, ctx)
    return result if ctx.is_main else fn()


def _gather_rows(values: list[float], ctx: DistContext) -> list[list[float]]:
    """Every rank's ``values`` (float64), in rank order, on every rank."""
    mine = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    rows = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(rows, mine)
    return [row.tolist() for row in rows]


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of ``value`` over all ranks, identical on every rank.

    Adds in rank order (not the order a reduction happens to use), so every rank
    gets the same bits. With one process, ``value`` is returned as it is.
    """
    if not ctx.distributed:
        return value
    return sum(row[0] for row in _gather_rows([value], ctx)) / ctx.world_size


def average_loss(loss: float, count: int, ctx: DistContext) -> tuple[float, int]:
    """Combine each rank's mean ``loss`` over ``count`` tokens into the global mean.

    Args:
        loss: this rank's mean loss (any value when ``count`` is 0).
        count: the number of tokens it averages; 0 for a rank that scored nothing.
        ctx: this process's context.

    Returns:
        ``(mean loss over all ranks' tokens, total token count)``, the same on every
        rank. With one process, ``(loss, count)`` unchanged.

    Raises:
        ValueError: no rank scored any token.
    """
    if not ctx.distributed:
        return loss, count
    rows = _gather_rows([loss * count if count else 0.0, float(count)], ctx)
    total, tokens = sum(row[0] for row in rows), int(sum(row[1] for row in rows))
    if tokens == 0:
        raise UserError("validation: no rank had any token to score")
    return total / tokens, tokens


# --------------------------------------------------------------------------- data


def check_batch_size(batch_size: int, ctx: DistContext) -> None:
    """Raise ``ValueError`` unless ``batch_size`` streams split evenly over the ranks."""
    if batch_size % ctx.world_size:
        raise UserError(
            f"data.batch_size={batch_size} is not divisible by the {ctx.world_size} "
            f"processes: each takes batch_size / {ctx.world_size} streams, so choose a "
            f"multiple of {ctx.world_size}"
        )


def shard_streams(data: Tensor, ctx: DistContext) -> Tensor:
    """This rank's equal share of the streams of a batchified split.

    Args:
        data: ``(N, B)`` from :func:`~moglstm.lm.data.batchify` with the global ``B``.
        ctx: this process's context.

    Returns:
        ``data[:, r*B/W : (r+1)*B/W]`` as a contiguous ``(N, B/W)`` tensor (``data``
        itself for one process).
    """
    if not ctx.distributed:
        return data
    check_batch_size(data.size(1), ctx)
    width = data.size(1) // ctx.world_size
    return data[:, ctx.rank * width : (ctx.rank + 1) * width].contiguous()


def shard_eval_streams(data: Tensor, ctx: DistContext) -> Tensor:
    """This rank's share of the evaluation streams, as even as possible.

    The first ``B mod W`` ranks take one stream more; with fewer streams than ranks
    some ranks get none (shape ``(N, 0)``) and score nothing.
    """
    if not ctx.distributed:
        return data
    return torch.tensor_split(data, ctx.world_size, dim=1)[ctx.rank].contiguous()


def local_token_cap(max_tokens: int | None, streams: int, local_streams: int) -> int | None:
    """Translate a global cap on scored tokens into this rank's cap.

    A cap of ``max_tokens`` over ``streams`` streams scores ``ceil(max_tokens /
    streams)`` rows; this rank scores the same rows of its ``local_streams``.
    """
    if max_tokens is None or streams == local_streams:
        return max_tokens
    rows = -(-max_tokens // streams)
    return rows * local_streams


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel`, or itself alone.

    Train through the wrapper (it averages gradients over ranks); evaluate and save
    ``model`` itself.
    """
    if not ctx.distributed:
        return model
    kwargs: dict[str, Any] = {}
    if ctx.device.type == "cuda":
        kwargs["device_ids"] = [ctx.device.index]
    # our models hold no buffer that training changes: nothing to re-send every step
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = (
        False
    )
    return nn.parallel.DistributedDataParallel(model, **kwargs)


# --------------------------------------------------------------------------- carried state


def _batch_dim(t: Tensor) -> int:
    # states are batch-second like torch.nn.LSTM's (layers, B, H); a (B, H) one batch-first
    return max(t.dim() - 2, 0)


def gather_state(state: Any, ctx: DistContext) -> Any:
    """The carried recurrent state of the whole global batch, on every rank.

    Each state tensor holds the batch in its second-to-last dimension (``(layers,
    B/W, H)`` as :class:`torch.nn.LSTM` returns; ``(B/W,)`` when 1-D); the ranks'
    tensors are concatenated there in rank order. ``None`` stays ``None``.
    """
    if not ctx.distributed or state is None:
        return state

    def gather(t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=_batch_dim(t))

    return map_state(state, gather)


def scatter_state(state: Any, ctx: DistContext) -> Any:
    """This rank's columns of a global carried state (the inverse of :func:`gather_state`).

    Raises:
        ValueError: a state tensor's batch does not divide by the number of ranks.
    """
    if not ctx.distributed or state is None:
        return state

    def take(t: Tensor) -> Tensor:
        dim = _batch_dim(t)
        if t.size(dim) % ctx.world_size:
            raise UserError(
                f"the checkpoint's carried state has a batch of {t.size(dim)}, which does "
                f"not split over {ctx.world_size} processes"
            )
        width = t.size(dim) // ctx.world_size
        return t.narrow(dim, ctx.rank * width, width).contiguous()

    return map_state(state, take)


# --------------------------------------------------------------------------- random numbers


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for rank ``rank`` derived from the run's ``seed`` (and a ``step``).

    A hash, so that runs with neighbouring seeds do not share rank streams.
    """
    digest = hashlib.sha256(f"moglstm:{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


def seed_rank_generators(seed: int, ctx: DistContext) -> None:
    """With several ranks, reseed Python's and torch's generators from ``(seed, rank)``.

    Called once the model is built (from the common seed), so that each rank draws
    its own dropout masks. A no-op for one process, which keeps drawing from ``seed``.
    """
    if ctx.distributed:
        _seed_all(rank_seed(seed, ctx.rank))


def gather_rng(ctx: DistContext) -> dict[str, Any]:
    """``{"rng_per_rank": [state of rank 0, rank 1, ...]}`` for a checkpoint; ``{}`` alone.

    Each state is :func:`~moglstm.lm.runtime.capture_rng_state`'s plain data.
    """
    if not ctx.distributed:
        return {}
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, capture_rng_state())
    return {"rng_per_rank": states}


def restore_rng(payload: Mapping[str, Any], ctx: DistContext, seed: int) -> None:
    """Restore this rank's generators from a checkpoint ``payload``.

    Rank ``r`` takes ``payload["rng_per_rank"][r]`` when present; a checkpoint of a
    single process has only ``payload["rng"]``, which is rank 0's. A rank that the
    checkpoint has no state for (more ranks than when it was saved) seeds its
    generators from ``(seed, step, r)``.
    """
    states = payload.get("rng_per_rank") or [payload["rng"]]
    if ctx.rank < len(states):
        restore_rng_state(states[ctx.rank])
        return
    step = int(payload.get("counters", {}).get("step", 0))
    _seed_all(rank_seed(seed, ctx.rank, step))
