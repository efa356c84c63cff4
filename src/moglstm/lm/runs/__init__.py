"""Runs on disk: run folders, checkpoints (one typed payload), loading and resuming.

:mod:`~moglstm.lm.runs.payload` describes what a training checkpoint holds;
:mod:`~moglstm.lm.runs.checkpoint` writes and reads checkpoint files safely and checks
their parts against each other; :mod:`~moglstm.lm.runs.folder` knows a run folder's
files, resolves and loads its checkpoints and holds the resume rules.
"""

from __future__ import annotations

from moglstm.lm.runs.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    load_newest_checkpoint,
    previous_path,
    remove_stale_temp_files,
    save_checkpoint,
)
from moglstm.lm.runs.folder import (
    CHECKPOINT_CHOICES,
    CHECKPOINT_FILES,
    RESUMABLE_KEYS,
    RUN_FILES,
    LoadedRun,
    RunExistsError,
    RunNotFoundError,
    load_run,
    resolve_checkpoint,
    resume_config,
)
from moglstm.lm.runs.payload import PAYLOAD_KEYS, CheckpointPayload, check_training_checkpoint

__all__ = [
    "CHECKPOINT_CHOICES",
    "CHECKPOINT_FILES",
    "FORMAT_VERSION",
    "PAYLOAD_KEYS",
    "RESUMABLE_KEYS",
    "RUN_FILES",
    "CheckpointError",
    "CheckpointPayload",
    "LoadedRun",
    "RunExistsError",
    "RunNotFoundError",
    "check_training_checkpoint",
    "load_checkpoint",
    "load_newest_checkpoint",
    "load_run",
    "previous_path",
    "remove_stale_temp_files",
    "resolve_checkpoint",
    "resume_config",
    "save_checkpoint",
]
