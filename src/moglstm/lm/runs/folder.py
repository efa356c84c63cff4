"""Run folders: what they hold, resolving and loading their checkpoints, the resume rules.

A run folder (``<out_dir>/<name>``) holds ``config.yaml``, ``metrics.jsonl`` and the
checkpoints of :data:`CHECKPOINT_FILES`. :func:`load_run` rebuilds a trained model from
one of them (for ``evaluate`` and ``generate``); :func:`resume_config` gives the config
a run continues with, allowing changes only to :data:`RESUMABLE_KEYS`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moglstm.lm.config import (
    RunConfig,
    apply_overrides,
    current_key,
    from_dict,
    to_dict,
    validate,
)
from moglstm.lm.data import Vocab
from moglstm.lm.errors import UserError
from moglstm.lm.models import build_model
from moglstm.lm.runs.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_newest_checkpoint,
    previous_path,
    warn_once,
)
from moglstm.lm.runs.payload import check_training_checkpoint
from moglstm.lm.runtime import resolve_device
from moglstm.lm.safety import UnsafePathError, open_regular

__all__ = [
    "CHECKPOINT_CHOICES",
    "CHECKPOINT_FILES",
    "EVALUATIONS_FILE",
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "LoadedRun",
    "RunExistsError",
    "RunNotFoundError",
    "check_fresh",
    "load_run",
    "record_evaluation",
    "resolve_checkpoint",
    "resume_config",
]

logger = logging.getLogger("moglstm.lm.train")


class RunNotFoundError(UserError, FileNotFoundError):
    """No run (or no checkpoint to resume from) where the user pointed."""


class RunExistsError(UserError, FileExistsError):
    """A new run was asked for in a folder that already holds one."""


#: One JSON line per ``evaluate`` of a run (written beside its checkpoints).
EVALUATIONS_FILE = "evaluations.jsonl"
#: The checkpoints ``evaluate``/``generate`` choose between (``--checkpoint``).
CHECKPOINT_CHOICES = ("best", "last")
#: Config keys that may differ from the checkpoint's when resuming: where things are,
#: how long to go on, and how often to log and check. Everything else is fixed by the
#: checkpoint (changing it would not continue the same run).
RESUMABLE_KEYS = frozenset(
    {
        "name",
        "out_dir",
        "data.data_dir",
        "data.cache_dir",
        "data.path",
        "data.train_path",
        "data.valid_path",
        "data.test_path",
        "data.eval_batch_size",
        "train.max_steps",
        "train.max_time",
        "train.eval_every",
        "train.log_every",
        "train.early_stop_patience",
        "train.eval_max_tokens",
        "train.device",
        "train.threads",
        "train.amp",
        "train.nonfinite",
        "train.rollback_lr_factor",
        "train.max_nonfinite",
        "train.check_memory",
        "train.dist_timeout",
    }
)

#: The checkpoints of a run folder: a folder without any holds a run that can only start over.
CHECKPOINT_FILES = ("last.pt", "last.prev.pt", "best.pt", "best.prev.pt")
#: Files whose presence marks a folder as holding a run.
STATUS_FILE = "status.json"  # how a run's last session ended (written by train)
RUN_FILES = ("config.yaml", "metrics.jsonl", STATUS_FILE, *CHECKPOINT_FILES)



def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resumable(saved: RunConfig, wanted: RunConfig) -> None:
    """Raise ValueError naming every non-resumable key on which the configs differ."""
    old, new = _flat(to_dict(saved)), _flat(to_dict(wanted))
    changed = [
        k
        for k in new
        if new[k] != old.get(k) and k not in RESUMABLE_KEYS and k not in _solved(old, new)
    ]
    if changed:
        details = ", ".join(f"{k} (checkpoint {old.get(k)!r}, now {new[k]!r})" for k in changed)
        raise UserError(
            f"cannot change {details} when resuming; only these may change: "
            f"{', '.join(sorted(RESUMABLE_KEYS))}. Start a new run (new name) instead."
        )


def _solved(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """The size that the same parameter budget solves: a checkpoint records the solved
    one (``with_resolved_sizes``), a preset asking for the same budget has its default."""
    budget = old.get("model.num_params")
    same = budget is not None and budget == new.get("model.num_params")
    return {"model.hidden_size"} if same else set()


def resume_config(
    run_dir: str | Path, overrides: Sequence[str] = (), preset: RunConfig | None = None
) -> RunConfig:
    """The config to resume the run in ``run_dir`` with: its checkpoint's, plus overrides.

    The config comes from ``last.pt`` (not ``config.yaml``); ``name`` and ``out_dir`` are
    set from ``run_dir`` so a moved folder resumes in place.

    Args:
        run_dir: the run folder, holding ``last.pt``.
        overrides: dotted ``key=value`` items; only keys in :data:`RESUMABLE_KEYS` may
            change. Others may repeat the checkpoint's value, so a run restarts with its
            original command line plus ``--resume``.
        preset: the config a preset (with the overrides) gives, when one was named
            too: it must agree with the checkpoint's on every key that cannot change.

    Raises:
        FileNotFoundError: there is no ``last.pt`` to resume from.
        ValueError: an override (or the preset) changes a key that cannot change on
            resume.
    """
    run_dir = Path(run_dir).expanduser()
    payload = _load_last(run_dir)
    cfg = from_dict(payload["config"])
    cfg.name, cfg.out_dir = run_dir.name, str(run_dir.parent)
    for item in overrides:
        key = current_key(str(item).partition("=")[0].strip())  # old names too
        if key in ("name", "out_dir"):
            raise UserError(f"override {item!r}: the run folder is {str(run_dir)!r}")
        if key not in RESUMABLE_KEYS and not _keeps_value(cfg, item):
            raise UserError(
                f"override {item!r}: {key} cannot change when resuming; only these may: "
                f"{', '.join(sorted(RESUMABLE_KEYS))}"
            )
    if preset is not None:
        try:
            _check_resumable(cfg, preset)
        except UserError as exc:
            raise UserError(f"--preset disagrees with the run being resumed: {exc}") from None
    return validate(apply_overrides(cfg, overrides))


def _keeps_value(cfg: RunConfig, item: str) -> bool:
    """Whether the override ``item`` leaves ``cfg`` as it is (repeats its value)."""
    return to_dict(apply_overrides(cfg, [item])) == to_dict(cfg)


def _load_last(run_dir: Path) -> dict[str, Any]:
    """The newest readable of ``last.pt`` and ``last.prev.pt`` (with a warning on a bad one);
    where neither is usable, ``best.pt`` (or ``best.prev.pt``), said once: a run killed
    between the two installs of its first save has only ``best.pt``, and resumes from it."""
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    chains = [p for p in (last, best) if os.path.lexists(p) or os.path.lexists(previous_path(p))]
    if not chains:
        _check_run_folder(run_dir)
        raise RunNotFoundError(
            f"nothing to resume: {str(run_dir)!r} has no last.pt (the run stopped before its "
            "first checkpoint, saved every train.eval_every steps); run the same command "
            "without --resume to start it over"
        )
    failures = []
    for chain in chains:
        try:
            payload, source = load_newest_checkpoint(chain, check=_resumable_checkpoint)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if chain == best:
            step = payload["counters"]["step"]
            warn_once(
                source,
                "%s has no usable last.pt: resuming from %s (step %d, its best validation)",
                run_dir,
                source.name,
                step,
            )
        return payload
    raise CheckpointError("; ".join(failures))


def _resumable_checkpoint(payload: dict[str, Any], path: Path) -> None:
    check_training_checkpoint(payload, path, resume=True)


def _check_run_folder(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunNotFoundError(f"nothing to resume: run folder {str(run_dir)!r} does not exist")


def check_fresh(run_dir: Path) -> None:
    found = [f for f in RUN_FILES if os.path.lexists(run_dir / f)]
    if found and not any(f in CHECKPOINT_FILES for f in found):
        _clear_unstarted(run_dir, found)
        return
    if found:
        raise RunExistsError(
            f"run folder {str(run_dir)!r} already holds a run ({', '.join(found)}); to train it "
            f"further: moglstm train --resume {run_dir} (with a higher train.max_steps if it has "
            "finished); to start a new run: another --name"
        )


def _clear_unstarted(run_dir: Path, found: list[str]) -> None:
    """Remove the files of a run that stopped before its first checkpoint (rank 0, locked).

    Nothing there can be resumed, so a new run starts over in the same folder.
    """
    logger.warning(
        "run folder %s holds a run stopped before its first checkpoint (%s): starting it over",
        run_dir,
        ", ".join(found),
    )
    for entry in [run_dir / f for f in found] + list(run_dir.glob("events.out.tfevents.*")):
        entry.unlink(missing_ok=True)




@dataclass
class LoadedRun:
    """A trained model rebuilt from a checkpoint.

    Attributes:
        model: the language model, in eval mode, on the requested device.
        vocab: the vocabulary it was trained with.
        config: the run's configuration.
        checkpoint: the path the model was read from.
        step: the training step the checkpoint was written at.
    """

    model: nn.Module
    vocab: Vocab
    config: RunConfig
    checkpoint: Path
    step: int


def resolve_checkpoint(run: str | Path, which: str = "best") -> Path:
    """Find the checkpoint file for ``run``.

    Args:
        run: a run folder (holding ``best.pt``/``last.pt``) or a checkpoint file. A
            file given directly may be a symbolic link (it is resolved); inside a run
            folder links are not followed (see :func:`load_run`).
        which: ``"best"`` or ``"last"``; used when ``run`` is a folder.

    Returns:
        The file given, or ``<run>/<which>.pt`` (which may be missing when its
        previous copy ``<which>.prev.pt`` is there).

    Raises:
        ValueError: ``which`` is not one of the choices.
        FileNotFoundError: nothing to load at ``run``.
    """
    if which not in CHECKPOINT_CHOICES:
        raise UserError(f"checkpoint={which!r} is not one of: {', '.join(CHECKPOINT_CHOICES)}")
    path = Path(run).expanduser()
    if path.is_file():
        return path.resolve()  # the user named this file: follow a link they gave
    if not path.exists():
        raise RunNotFoundError(f"run {str(path)!r} not found (give a run folder or a .pt file)")
    candidate = path / f"{which}.pt"
    if not _has_checkpoint(candidate):
        raise RunNotFoundError(
            f"run folder {str(path)!r} has no {which}.pt"
            + (_TRY_LAST if which == "best" and _has_checkpoint(path / "last.pt") else "")
            + " (a run saves one every train.eval_every steps)"
        )
    return candidate


_TRY_LAST = "; use its last checkpoint with --checkpoint last (checkpoint='last')"


def _has_checkpoint(path: Path) -> bool:
    return os.path.lexists(path) or os.path.lexists(previous_path(path))


def load_run(run: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the model, vocabulary and config of a trained run from one checkpoint.

    Args:
        run: a run folder or a checkpoint file (see :func:`resolve_checkpoint`).
        which: ``"best"`` or ``"last"`` when ``run`` is a folder.
        device: where to put the model (a :class:`torch.device` or a setting for
            :func:`resolve_device`).

    The checkpoint is checked against its own config before the model is built
    (:func:`~moglstm.lm.runs.payload.check_training_checkpoint`: names, shapes, finite
    values). In a run folder, a damaged or inconsistent ``<which>.pt`` falls back to
    ``<which>.prev.pt`` with a warning; when neither reads, the error says so and, for
    ``best``, suggests ``--checkpoint last``.

    Returns:
        A :class:`LoadedRun` whose model is in eval mode.

    Raises:
        FileNotFoundError: no checkpoint at ``run``.
        CheckpointError: no checkpoint there is readable and consistent (one line,
            naming the files).
    """
    path = resolve_checkpoint(run, which)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    configs: dict[Path, RunConfig] = {}

    def check(payload: dict[str, Any], where: Path) -> None:
        configs[where] = check_training_checkpoint(payload, where)

    if Path(run).expanduser().is_file():
        payload = load_checkpoint(path)
        check(payload, path)
    else:
        try:
            payload, path = load_newest_checkpoint(path, check=check)
        except CheckpointError as exc:
            has_last = which == "best" and _has_checkpoint(path.with_name("last.pt"))
            raise CheckpointError(f"{exc}{_TRY_LAST if has_last else ''}") from None
    cfg = configs[path]
    vocab = Vocab.from_dict(payload["vocab"])
    model = build_model(cfg.model, len(vocab))
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    step = int(payload.get("counters", {}).get("step", 0))
    return LoadedRun(model=model, vocab=vocab, config=cfg, checkpoint=path, step=step)


def record_evaluation(run_dir: Path, results: dict[str, Any]) -> None:
    """Append ``evaluate``'s results to the run's ``evaluations.jsonl``.

    A folder that cannot be written (a read-only copy of a run) only logs why.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:  # no link planted in the run folder is followed, no FIFO blocks
        with os.fdopen(open_regular(run_dir / EVALUATIONS_FILE, flags), "a", encoding="utf-8") as f:
            f.write(json.dumps(results) + "\n")
    except UnsafePathError as exc:
        logger.warning("evaluation not recorded: %s", exc)
    except OSError as exc:
        logger.debug("evaluation not recorded in %s: %s", run_dir, exc)
