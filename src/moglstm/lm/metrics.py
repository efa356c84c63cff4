"""What a run records: the metrics of a loss, and the run folder's ``metrics.jsonl``.

:func:`metrics_for` turns a mean loss into the numbers reported everywhere (perplexity
at word level, bits per character otherwise); :class:`MetricsLog` appends the training
loop's records to ``metrics.jsonl`` (and TensorBoard when installed), rewinding them
when a run resumes or rolls back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moglstm.lm.safety import open_regular, read_regular, write_atomic

__all__ = ["MetricsLog", "NullLog", "metric_name", "metrics_for"]


def metric_name(level: str) -> str:
    """``"ppl"`` (perplexity) for word-level corpora, ``"bpc"`` (bits per character) else."""
    return "ppl" if level == "word" else "bpc"


def metrics_for(loss: float, level: str) -> dict[str, float]:
    """``{"loss": loss, "ppl": exp(loss)}`` at word level, ``{"loss", "bpc"}`` otherwise.

    Args:
        loss: mean cross-entropy in nats per token.
        level: the corpus level (``word``, ``char`` or ``byte``).
    """
    if metric_name(level) == "bpc":
        return {"loss": loss, "bpc": loss / math.log(2)}
    try:
        ppl = math.exp(loss)
    except OverflowError:  # a diverged model: the perplexity is astronomically large
        ppl = math.inf
    return {"loss": loss, "ppl": ppl}


class MetricsLog:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard when installed).

    The training loop writes one record per event: ``split`` is ``"train"`` (every
    ``log_every`` steps; ``loss`` is the token-weighted mean since the previous
    record and ``tokens_per_s`` the training speed) or ``"valid"`` (each validation;
    ``tokens_per_s`` is the scoring speed). Every record also has ``step``,
    ``ppl`` (word level) or ``bpc`` (char/byte level), ``lr`` (the base rate after
    the schedule) and ``elapsed`` (wall seconds since the run began, over all sessions).

    Args:
        run_dir: the run folder.
        resume_step: when resuming from a checkpoint taken at this step, lines of
            later steps (written before the run stopped, after its last checkpoint)
            are removed first, so no event is recorded twice. ``None`` for a new run.
        tensorboard: also write TensorBoard events if ``torch.utils.tensorboard``
            imports.
        before_write: called before each record is written; an exception it raises
            stops the write (training passes :func:`~moglstm.lm.runlock.check_writer`).
    """

    def __init__(
        self,
        run_dir: str | Path,
        resume_step: int | None = None,
        tensorboard: bool = True,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._before_write = before_write
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step)
        self._file = _append(self.path)  # closed in close()
        self._writer = _tensorboard_writer(Path(run_dir), resume_step) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a flat dict with ``step`` and ``split``)."""
        if self._before_write is not None:
            self._before_write()  # e.g. the run's lock still holds this very folder
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{record['split']}/{key}", value, record["step"])
            # TensorBoard writes by file name from a thread: leave nothing pending that
            # could land in another folder if this one is replaced before the next write
            self._writer.flush()

    def hparams(self, config: dict[str, Any], results: dict[str, Any]) -> None:
        """Log the run's config and final metrics to TensorBoard's HParams view.

        ``config`` is the run's nested config (flattened to dotted keys); the metrics
        are the numeric ``results`` (``best_valid_loss``, ``best_valid_ppl``, ``step``,
        ``tokens_per_s`` ...), written as scalars ``hparams/<name>`` at the last step,
        in this run's own event files (no sub-folder per call, as ``add_hparams`` makes).
        A resumed run logs them again at its new last step.
        """
        if self._writer is None:
            return
        try:
            from torch.utils.tensorboard.summary import hparams
        except ImportError:  # a stand-in writer (tests), or a partial install
            return

        flat = {k: _hparam_value(v) for k, v in _flatten(config).items()}
        metrics = {
            f"hparams/{k}": float(v)
            for k, v in results.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        writer = self._writer._get_file_writer()
        for summary in hparams(flat, metrics):  # experiment, session start, session end
            writer.add_summary(summary)
        step = int(results.get("step") or 0)
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        """Close the file (and the TensorBoard writer, whose pending events it writes)."""
        self._file.close()
        if self._writer is not None:
            try:
                if self._before_write is not None:
                    self._before_write()
            except Exception:  # noqa: BLE001 (the run is failing with it already)
                # TensorBoard writes its files by name: its pending events would land in
                # whatever folder now has the run's path. Dropped instead.
                self._writer = None
                return
            self._writer.close()

    def rewind(self, step: int) -> None:
        """Forget the records of steps after ``step`` (the run went back to it)."""
        self._file.close()
        _truncate_metrics(self.path, step)
        self._file = _append(self.path)  # closed in close()
        if self._writer is not None:
            self._writer.close()
            self._writer = _tensorboard_writer(self.path.parent, step)


class NullLog:
    """Stands in for :class:`MetricsLog` on ranks other than 0, which write no files."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def hparams(self, config: dict[str, Any], results: dict[str, Any]) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass


def _append(path: Path) -> Any:
    """``path`` opened for appending text, never through a link planted in the run folder."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    return os.fdopen(open_regular(path, flags), "a", encoding="utf-8")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the complete lines of ``path`` with ``step <= step``; atomic rewrite."""
    if not os.path.lexists(path):
        return
    kept = []
    for line in read_regular(path).decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut off by the crash
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept).encode("utf-8"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _hparam_value(value: Any) -> bool | int | float | str:
    """What TensorBoard's HParams take: numbers, text and booleans (the rest as text)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _tensorboard_writer(run_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    # purge_step drops events a crashed session wrote after its last checkpoint
    return SummaryWriter(str(run_dir), purge_step=None if purge_step is None else purge_step + 1)
