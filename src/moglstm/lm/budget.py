"""Budgets: parameters (compare models at equal size) and memory (refuse what cannot fit).

``model.num_params=24M`` asks for the largest hidden size whose model has at most
24 million parameters. This module holds the two model-independent pieces:

* :func:`parse_count` reads a count written as ``"24M"``, ``"24e6"``, ``"2.4e7"`` or
  ``24000000``;
* :func:`largest_fitting` is the search: given ``count(size)`` (the number of
  parameters of the model of that size, or ``None`` where that size cannot be built)
  it finds the largest size whose count fits the budget.

:func:`moglstm.lm.models.build_model` counts a candidate by building it on the
``meta`` device (no memory is allocated), so every architecture option is counted
exactly as it will be built.

Memory: before a run builds its model, :func:`check_training_fits` counts the
parameters on the ``meta`` device, estimates what training needs
(:func:`training_memory`: weights, gradients and Adam's moments, plus the
activations one window keeps for the backward pass) and compares it with the
memory available (:func:`available_memory`: the GPU's free memory, or the
machine's available RAM within any container limit). A run that cannot fit is
refused with the numbers (:class:`MemoryBudgetError`); ``train.check_memory=false``
skips the check. An allocation that fails anyway becomes one line
(:func:`allocation_failure`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moglstm.lm.errors import UserError
from moglstm.lm.safety import short_repr

__all__ = [
    "MAX_SEARCHED_SIZE",
    "SYSTEM_ROOT",
    "MemoryBudgetError",
    "MemoryEstimate",
    "allocation_failure",
    "available_memory",
    "memory_limits",
    "check_training_fits",
    "largest_fitting",
    "parse_count",
    "training_memory",
]

#: The largest size :func:`largest_fitting` considers by default.
MAX_SEARCHED_SIZE = 1 << 16

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_COUNT_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*", re.IGNORECASE)


def parse_count(value: str | int | float) -> int:
    """Read a parameter count: ``"24M"``, ``"1.5k"``, ``"24e6"``, ``24000000`` or ``2.4e7``.

    Suffixes ``k``, ``M`` and ``G`` (or ``B``) are powers of 1000, case-insensitive.

    Args:
        value: the count, as text or a number.

    Returns:
        The count as a positive int.

    Raises:
        ValueError: the text is not a count, or the count is not a positive whole number.
        TypeError: ``value`` is neither text nor a number.

    Example::

        >>> parse_count("24M"), parse_count("24e6"), parse_count(24_000_000)
        (24000000, 24000000, 24000000)
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"count: expected text like '24M' or a number, got {short_repr(value)}")
    if isinstance(value, str):
        match = _COUNT_RE.fullmatch(value)
        if match is None:
            raise UserError(
                f"{short_repr(value)} is not a parameter count (write e.g. 24M, 1.5k, 24e6 or "
                "24000000)"
            )
        number = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    else:
        number = float(value)
    if not math.isfinite(number) or number < 1 or abs(number - round(number)) > 1e-6 * number:
        raise UserError(f"{short_repr(value)} must be a positive whole number of parameters")
    return int(round(number))


def largest_fitting(
    count: Callable[[int], int | None], budget: int, *, high: int = MAX_SEARCHED_SIZE
) -> int:
    """The largest ``size`` in ``[1, high]`` with ``count(size) <= budget``.

    ``count`` must grow with ``size``, and return ``None`` for sizes too small to be
    built (e.g. a hidden size not above a mogrifier rank); sizes that can be built
    must form a range ``[smallest, high]``. Binary searches: about ``2 log2(high)``
    calls.

    Args:
        count: the number of parameters of the model of a given size, or ``None``.
        budget: the largest number of parameters allowed.
        high: the largest size considered.

    Raises:
        ValueError: no size fits (even the smallest buildable one is over budget), or
            no size up to ``high`` can be built.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise UserError(f"budget must be a positive int, got {short_repr(budget)}")
    if isinstance(high, bool) or not isinstance(high, int) or high < 1:
        raise UserError(f"high must be a positive int, got {short_repr(high)}")
    smallest = _first(lambda n: count(n) is not None, 1, high)
    if smallest is None:
        raise UserError(f"no size up to {high} can be built")
    least = count(smallest)
    if least > budget:
        raise UserError(
            f"a budget of {budget:,} parameters is too small: the smallest model "
            f"(size {smallest}) has {least:,}"
        )
    too_big = _first(lambda n: count(n) > budget, smallest, high)
    return high if too_big is None else too_big - 1


def _first(pred: Callable[[int], bool], low: int, high: int) -> int | None:
    """Smallest ``n`` in ``[low, high]`` with ``pred(n)``, for ``pred`` false-then-true."""
    if not pred(high):
        return None
    while low < high:
        mid = (low + high) // 2
        if pred(mid):
            high = mid
        else:
            low = mid + 1
    return low


# --------------------------------------------------------------------------- memory

_FLOAT_BYTES = 4  # parameters, gradients, moments and activations are float32
_STATE_COPIES = 4  # weights, gradients, Adam's exp_avg and exp_avg_sq


class MemoryBudgetError(UserError):
    """Training the configured model would need more memory than the device has."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What training a model needs, in bytes (an estimate, not a measurement).

    Attributes:
        parameters: the number of parameters (exact: counted on the ``meta`` device).
        state: weights, gradients and the optimizer's two moments (and a running
            average of the weights when ``train.average_*`` may start one).
        activations: what the forward pass of one training window keeps for the
            backward pass, for this process's share of the batch.
        tokens: the tokens of that window (streams x ``data.bptt``).
        buffers: tensors the model holds besides its parameters (the Transformer's
            sinusoidal table of ``max_len x d_model``).
    """

    parameters: int
    state: int
    activations: int
    tokens: int
    buffers: int = 0

    @property
    def total(self) -> int:
        """``state + activations + buffers``."""
        return self.state + self.activations + self.buffers


def training_memory(
    cfg: Any, vocab_size: int, parameters: int, world_size: int = 1
) -> MemoryEstimate:
    """Estimate the memory of training ``cfg``'s model (a :class:`RunConfig`).

    The activation term counts, per token and layer, the tensors a step keeps for
    the backward pass: for a recurrent layer of width ``H`` its four gates before and
    after their nonlinearities, ``c``, ``tanh(c)`` and ``h`` (``11 H``), each mogrifier
    round's gate and gated vector (``2 H`` per round) and dropout's input (``2 H``); for
    a Transformer block ``16 d`` plus ``2 heads x bptt`` attention weights; for the
    output layer the logits, their log-softmax and its gradient (``3 V``, times the
    mixture's components with ``model.output.mos_components``). Meant to catch sizes that
    cannot fit at all, it errs low: 0.6 to 0.8 of the peak memory measured on CPU by
    ``experiments/memory_estimate.py`` (see docs/reliability.md).

    Args:
        cfg: the run's config.
        vocab_size: the vocabulary size.
        parameters: the model's parameter count.
        world_size: processes sharing the batch (each keeps activations for its share).
    """
    m, d = cfg.model, cfg.data
    tokens = max(1, d.batch_size // world_size) * d.bptt
    if m.kind == "transformer":
        per_layer = 16 * m.transformer.d_model + 2 * m.transformer.heads * d.bptt
        layers, width = m.transformer.depth, m.transformer.d_model
    else:
        rounds = m.mogrifier.rounds if m.kind == "mogrifier" else 0
        width = max(m.hidden_size, m.embedding_size or 0)
        per_layer = (13 + 2 * rounds) * width
        layers = m.num_layers
    output = 3 * vocab_size * max(1, m.output.mos_components)
    per_token = layers * per_layer + 2 * width + output
    averaging = cfg.train.average_after_bad_evals or cfg.train.average_from_step
    copies = _STATE_COPIES + (1 if averaging else 0)
    t = m.transformer
    sinusoid = m.kind == "transformer" and t.positional and t.positional_kind == "sinusoidal"
    return MemoryEstimate(
        parameters=parameters,
        state=parameters * copies * _FLOAT_BYTES,
        activations=tokens * per_token * _FLOAT_BYTES,
        tokens=tokens,
        buffers=t.max_len * t.d_model * _FLOAT_BYTES if sinusoid else 0,
    )


#: Where :func:`memory_limits` finds ``/proc`` and ``/sys`` (tests point it at a fake tree).
SYSTEM_ROOT = Path("/")


def available_memory(device: Any, root: str | os.PathLike | None = None) -> tuple[int, str] | None:
    """``(bytes available, where)`` on ``device`` (a :class:`torch.device`), or ``None``.

    CUDA: the GPU's free memory (:func:`torch.cuda.mem_get_info`). CPU: the smallest
    of the machine's available memory (``MemAvailable``) and, for this process's own
    cgroup and each cgroup above it (v2 ``memory.max``, v1 ``memory.limit_in_bytes``,
    found through ``/proc/self/cgroup`` and ``/proc/self/mountinfo``), its limit less
    its use; ``where`` says which one it is. ``None`` where it cannot be told (e.g. MPS).

    Args:
        root: where ``/proc`` and ``/sys`` are found; ``None``: :data:`SYSTEM_ROOT`.
    """
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"GPU {device} has"
    if device.type != "cpu":
        return None
    return min(memory_limits(root), default=None)


def memory_limits(root: str | os.PathLike | None = None) -> list[tuple[int, str]]:
    """Every bound on this process's memory that can be read: ``(bytes, where)`` each.

    ``where`` completes "... has N available": ``"this machine has"`` or ``"this
    process's cgroup /x (v2: memory.max 3.0 GB, 0.5 GB in use) has"``. Reads a few
    small files; a cgroup path is walked up to its mount, so the cost is bounded by
    the path's depth.
    """
    root = Path(SYSTEM_ROOT if root is None else root)
    found = []
    machine = _meminfo_available(root)
    if machine is not None:
        found.append((machine, "this machine has"))
    for version, folder, name in _cgroup_folders(root):
        limit_file, usage_file = _CGROUP_FILES[version]
        limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
        if limit is None or limit >= 1 << 60:  # "max" or a huge number: no limit here
            continue
        usage = usage or 0
        found.append(
            (
                max(0, limit - usage),
                f"this process's cgroup {name} ({version}: {limit_file} {_size(limit)}, "
                f"{_size(usage)} in use) has",
            )
        )
    return found


_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes"),
}
_MAX_SMALL_FILE = 1 << 20  # /proc/self/mountinfo and friends: far smaller


def _read_small(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_SMALL_FILE).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_small(path)
    text = text.strip() if text is not None else ""
    return int(text) if text.isdigit() and len(text) < 40 else None


def _cgroup_folders(root: Path) -> list[tuple[str, Path, str]]:
    """``(version, folder, cgroup path)`` of this process's memory cgroup and its parents."""
    cgroups = _read_small(root / "proc/self/cgroup") or ""
    mounts = _cgroup_mounts(root)
    out = []
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        version = "v2" if hierarchy == "0" and controllers == "" else "v1"
        if version == "v1" and "memory" not in controllers.split(","):
            continue
        for mount_root, mount_point in mounts.get(version, []):
            relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) else "."
            relative = "" if relative == "." or relative.startswith("..") else relative
            base = root / mount_point.lstrip("/")
            levels = [p for p in Path(relative).parts if p not in ("/", "..")][:64]
            for depth in range(len(levels), -1, -1):  # the process's cgroup, then each parent
                name = "/" + "/".join(levels[:depth])
                out.append((version, base.joinpath(*levels[:depth]), name))
    return out


def _cgroup_mounts(root: Path) -> dict[str, list[tuple[str, str]]]:
    """``{"v2": [(mount root, mount point)], "v1": [...]}`` from /proc/self/mountinfo
    (v1: only hierarchies with the memory controller); the usual places if unreadable."""
    text = _read_small(root / "proc/self/mountinfo")
    if text is None:
        return {"v2": [("/", "/sys/fs/cgroup")], "v1": [("/", "/sys/fs/cgroup/memory")]}
    mounts: dict[str, list[tuple[str, str]]] = {"v2": [], "v1": []}
    for line in text.splitlines():
        head, _, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        if extra[0] == "cgroup2":
            mounts["v2"].append((fields[3], fields[4]))
        elif extra[0] == "cgroup" and "memory" in extra[2].split(","):
            mounts["v1"].append((fields[3], fields[4]))
    return mounts


def _meminfo_available(root: Path = Path("/")) -> int | None:
    for line in (_read_small(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                break
    if root != Path("/"):
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_training_fits(
    cfg: Any, vocab_size: int, device: Any, world_size: int = 1
) -> MemoryEstimate:
    """Refuse a run whose training cannot fit in ``device``'s memory, before building it.

    The parameters are counted from a few tiny models on the ``meta`` device (nothing
    allocated, and nothing proportional to the config's numbers) and
    :func:`training_memory` estimates the rest. With ``cfg.train.check_memory`` off,
    or where the available memory cannot be told, only the count is checked (a model
    too large to describe at all is still refused).

    Returns:
        The estimate.

    Raises:
        MemoryBudgetError: the estimate exceeds the memory available (the message
            gives both, what makes up the estimate, and the keys to change).
    """
    from moglstm.lm.models import parameter_count

    try:
        parameters = parameter_count(cfg.model, vocab_size)  # bounded: a few tiny meta models
    except (RuntimeError, OverflowError) as exc:  # a size whose element count overflows
        raise MemoryBudgetError(
            f"the model of this config is too large to build at all ({_first_line(exc)}); "
            "lower model.hidden_size (or model.transformer.d_model) or model.num_layers"
        ) from None
    estimate = training_memory(cfg, vocab_size, parameters, world_size)
    room = available_memory(device) if cfg.train.check_memory else None
    if room is not None and estimate.total > room[0]:
        available, where = room
        raise MemoryBudgetError(
            f"training this model needs about {_size(estimate.total)} but {where} "
            f"{_size(available)} available: {parameters:,} parameters take "
            f"{_size(estimate.state)} (weights, gradients, Adam's moments) and a window of "
            f"{estimate.tokens:,} tokens (data.batch_size x data.bptt) about "
            f"{_size(estimate.activations)} of activations{_buffers(estimate)}. Lower "
            f"{_keys_to_lower(cfg)}, or set train.check_memory=false to try anyway"
        )
    return estimate


def _buffers(estimate: MemoryEstimate) -> str:
    if not estimate.buffers:
        return ""
    return f", and the position table (model.transformer.max_len) {_size(estimate.buffers)}"


def _keys_to_lower(cfg: Any) -> str:
    if cfg.model.kind == "transformer":
        return (
            "model.transformer.d_model, model.transformer.depth, model.transformer.max_len, "
            "data.batch_size or data.bptt"
        )
    return "model.hidden_size, model.num_layers, data.batch_size or data.bptt"


#: What to lower after an allocation failure, by command (``train``'s for any other).
_OOM_HINTS = {
    "report": "a file in one of the run folders may be too large: report the runs one at a time "
    "to find it",
    "tune": "a trial (or the search-space file) needs more than there is: narrow the space's "
    "upper bounds or its preset's sizes",
}
_TRAIN_HINT = "lower model.hidden_size, data.batch_size or data.bptt"


def allocation_failure(exc: BaseException, command: str = "train") -> str | None:
    """One line for an allocation that failed (CPU or GPU) in ``moglstm command``, with a
    hint that fits the command; ``None`` for other errors."""
    import torch

    text = str(exc)
    if not (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or (isinstance(exc, RuntimeError) and _ALLOCATION_FAILED.search(text))
    ):
        return None
    return f"out of memory ({_first_line(exc)}); {_OOM_HINTS.get(command, _TRAIN_HINT)}"


_ALLOCATION_FAILED = re.compile(r"can't allocate memory|out of memory|DefaultCPUAllocator", re.I)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else type(exc).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"
