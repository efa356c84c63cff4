"""Reports on training runs: learning curves in one figure and a markdown table.

:func:`read_run` gathers what a run folder holds (``config.yaml``,
``metrics.jsonl``, ``evaluations.jsonl``, a checkpoint for the parameter count),
tolerating a run still in progress (a half-written last line, no checkpoint yet).
:func:`report` compares one or several runs::

    moglstm report runs/ptb-small runs/ptb-small-lstm --out ptb-small

writes ``ptb-small.png`` and ``ptb-small.svg`` (validation perplexity or bits per
character and training loss, against steps and against wall-clock time) and
``ptb-small.md`` (the table, also printed), best validation first: per run its state
(running, done, early stop, time limit, interrupted, pruned, crashed; from the
run's ``status.json``) and, for a trial of a ``moglstm tune`` study, Optuna's state
and objective, the config keys in which the runs differ, the parameter count, best
and final validation, the latest test evaluation (``moglstm evaluate --split test``
records it in the run folder), the training speed and the time spent; with
``--csv``/``--json`` the same rows as ``ptb-small.csv``/``.json``. Many runs stay
legible: the best few are named and coloured, the rest drawn faint.

The figure needs matplotlib (``pip install 'moglstm[plot]'``); the table does not.

Why about 750 lines: reading a run (its curves, end state and study trial), the
table with its exports, and the figure are three views of one :class:`RunRecord`
that change together; each is a section of its own below.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.errors import UserError
from moglstm.lm.runs.folder import EVALUATIONS_FILE, STATUS_FILE
from moglstm.lm.safety import (
    MAX_RUN_TEXT_BYTES,
    load_yaml_file,
    open_run_file,
    read_regular,
    short_repr,
)

__all__ = [
    "FIGURE_FORMATS",
    "MissingExtraError",
    "RunRecord",
    "config_differences",
    "find_runs",
    "markdown_table",
    "plot_runs",
    "read_jsonl",
    "read_run",
    "require",
    "report",
    "rows_csv",
    "run_rows",
    "sort_runs",
]

logger = logging.getLogger(__name__)

FIGURE_FORMATS = ("png", "svg")
# never shown as differences: the run column names the run already
_IGNORED_KEYS = frozenset({"name", "out_dir"})


class MissingExtraError(UserError, RuntimeError):
    """An optional dependency (an extra of the moglstm package) is not installed."""


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtraError` telling how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{what} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'moglstm[{extra}]'"
        ) from None


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    """What a run folder holds, as :func:`read_run` found it.

    Attributes:
        path: the run folder.
        config: the resolved config, flattened to dotted keys (empty if unreadable).
        train: the ``split == "train"`` records of ``metrics.jsonl``, in order.
        valid: the ``split == "valid"`` records.
        evaluations: the records of ``evaluations.jsonl`` (``evaluate``'s results).
        params: number of parameters (counted once per tied tensor), ``None`` before
            the first checkpoint.
        running: a training process holds the folder's lock right now.
        ended: how the last training session ended (its ``status.json``: ``step``,
            ``stopped``, ``error``), ``None`` for runs of older versions.
        trial: for a trial of a ``moglstm tune`` study (the study's ``study.db`` beside
            the run folder): ``{"study", "number", "state", "value"}`` with Optuna's
            state in lower case (``complete``, ``pruned``, ``fail``, ``running``).
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    params: int | None = None
    running: bool = False
    ended: dict[str, Any] | None = None
    trial: dict[str, Any] | None = None
    saved_elapsed: float | None = None  # the time trained by last.pt's step (it may be later
    # than the last log line: a run stopped by Ctrl-C)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metric(self) -> str:
        """``"ppl"`` or ``"bpc"``: the one the run's records carry (``"ppl"`` if none yet)."""
        for record in self.valid + self.train:
            if "bpc" in record:
                return "bpc"
        return "ppl"

    @property
    def step(self) -> int:
        records = self.train + self.valid
        return max((r["step"] for r in records), default=0)

    @property
    def elapsed(self) -> float | None:
        times = [r["elapsed"] for r in self.train + self.valid if "elapsed" in r]
        if self.saved_elapsed is not None:
            times.append(self.saved_elapsed)
        return max(times) if times else None

    @property
    def best_valid(self) -> dict[str, Any] | None:
        finite = [r for r in self.valid if math.isfinite(r["loss"])]
        return min(finite, key=lambda r: r["loss"]) if finite else None

    @property
    def tokens_per_s(self) -> float | None:
        """Median training speed over the logged windows."""
        speeds = [r["tokens_per_s"] for r in self.train if r.get("tokens_per_s")]
        return statistics.median(speeds) if speeds else None

    @property
    def test(self) -> dict[str, Any] | None:
        """The latest ``evaluate`` of the test split, or ``None``."""
        tests = [e for e in self.evaluations if e.get("split") == "test"]
        return tests[-1] if tests else None

    @property
    def status(self) -> str:
        """How the run stands: ``running``; ``done`` (reached ``train.max_steps``),
        ``early stop``, ``time limit`` (``train.max_time``): finished; ``interrupted``
        (Ctrl-C, SIGTERM), ``pruned`` (by a study's pruner), ``crashed`` (an error, or a
        session killed outright: its records go past the last recorded end); ``stopped``
        when a run of an older version left no record of how it ended."""
        if self.running:
            return "running"
        max_steps = self.config.get("train.max_steps")
        ended = self.ended
        if ended is None:  # an older run: only the step count tells
            done = max_steps is not None and self.step >= max_steps
            return "done" if done else "stopped"
        if not isinstance(ended.get("step"), int) or ended["step"] < self.step:
            return "crashed"  # a later session wrote records and no end: killed
        stopped = ended.get("stopped")
        if stopped == "error":  # a study's pruner and signals end a trial by exceptions
            error = str(ended.get("error", "")).partition(":")[0]
            return _STUDY_ERRORS.get(error, "crashed")
        return _ENDINGS.get(stopped, "stopped")

    @property
    def objective(self) -> float | None:
        """What the runs are sorted by: the best validation loss (a study's objective)."""
        best = self.best_valid
        return None if best is None else best["loss"]


# status.json's `stopped` -> the state a report shows
_ENDINGS = {
    "max_steps": "done",
    "early_stop": "early stop",
    "max_time": "time limit",
    "SIGINT": "interrupted",
    "SIGTERM": "interrupted",
    "interrupted": "interrupted",
}
_STUDY_ERRORS = {"TrialPruned": "pruned", "StudyInterrupted": "interrupted"}
STATES = ("running", "done", "early stop", "time limit", "interrupted", "pruned", "crashed")


def read_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder (finished, stopped or still training).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no ``metrics.jsonl``
            and no ``config.yaml``.
    """
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {str(path)!r} not found")
    metrics, config_file = path / "metrics.jsonl", path / "config.yaml"
    if not metrics.is_file() and not config_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a run folder (it has no metrics.jsonl or config.yaml)"
        )
    run = RunRecord(path=path)
    if config_file.is_file():
        run.config = _read_config(config_file)
    records = read_jsonl(metrics)
    run.train = [r for r in records if r.get("split") == "train"]
    run.valid = [r for r in records if r.get("split") == "valid"]
    run.evaluations = read_jsonl(path / EVALUATIONS_FILE)
    run.params = _count_parameters(path)
    run.saved_elapsed = _saved_elapsed(path)
    run.running = _is_running(path)
    run.ended = _read_status(path / STATUS_FILE)
    run.trial = _study_trial(path)
    return run


def _read_status(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"step": None}  # unreadable: treated as no end recorded
    return record if isinstance(record, dict) else {"step": None}


def _study_trial(path: Path) -> dict[str, Any] | None:
    """The Optuna trial whose run folder is ``path``, from ``study.db`` beside it."""
    trials = _study_trials(path.parent)
    return trials.get(path.name)


_STUDIES: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}


def _study_trials(folder: Path) -> dict[str, dict[str, Any]]:
    """``{run folder name: trial}`` of every study in ``folder/study.db`` (read once per
    report while the file is unchanged); empty without the file or Optuna."""
    db = folder / "study.db"
    try:
        key = (str(db.resolve()), db.stat().st_mtime)
    except OSError:
        return {}
    if key in _STUDIES:
        return _STUDIES[key]
    found: dict[str, dict[str, Any]] = {}
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(
            f"sqlite:///{db}", skip_compatibility_check=True, skip_table_creation=True
        )
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False):
                run_dir = t.user_attrs.get("run_dir")
                if run_dir is None or t.user_attrs.get("skipped"):
                    continue
                # a retried trial runs in the folder it retries: the latest trial wins
                found[Path(run_dir).name] = {
                    "study": summary.study_name,
                    "number": t.number,
                    "state": t.state.name.lower(),
                    "value": t.value,
                }
        storage.remove_session()
        storage.engine.dispose()
    except Exception as exc:  # no Optuna, another schema, a locked or broken file
        logger.debug("no trials from %s: %s", db, exc)
    _STUDIES[key] = found
    return found


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run folders named by ``paths``: each a run folder, or a folder of run folders
    (such as a ``moglstm tune`` study), whose runs are taken in name order.

    Raises:
        FileNotFoundError: a path does not exist or holds no run.
    """
    found: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {str(path)!r} not found")
        if _is_run(path):
            found.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
        if not inner:
            raise FileNotFoundError(
                f"{str(path)!r} is not a run folder and holds none (no metrics.jsonl)"
            )
        found += inner
    return found


def _read_config(path: Path) -> dict[str, Any]:
    """The saved config as dotted keys, read as plain YAML: a report needs no validation
    (and so also reads runs of other moglstm versions: older ones upgraded, so their keys
    compare with the current names); unreadable gives ``{}``."""
    from moglstm.lm.config import upgrade
    from moglstm.lm.runs.folder import _flat  # runs imports nothing from here

    try:  # a run folder may be hostile: no aliases, a size cap, no link followed
        data = load_yaml_file(path, f"run config {short_repr(str(path))}", in_run_folder=True)
    except (OSError, ValueError) as exc:  # one bounded line, then on with the other runs
        why = exc if isinstance(exc, ValueError) else f"cannot read {str(path)!r}: {exc.strerror}"
        logger.warning("%s; its settings are left out", why)
        return {}
    if not isinstance(data, dict):
        return {}
    try:
        data = upgrade(data)
    except UserError:  # a newer version: shown as it is
        pass
    return _flat(data)


def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete JSON-object lines of ``path`` (a line being written is skipped; no
    file, no records). The file is read like every run-folder file
    (:func:`~moglstm.lm.safety.read_regular`: no link followed, no FIFO waited on, size
    capped); lines that are not UTF-8 JSON objects with well-typed values are left out
    with one warning line for the file."""
    if not os.path.lexists(path):
        return []
    try:
        raw = read_regular(path, MAX_RUN_TEXT_BYTES)
    except (OSError, UserError) as exc:
        why = exc if isinstance(exc, UserError) else f"cannot read {str(path)!r}: {exc.strerror}"
        logger.warning("%s; its records are left out", why)
        return []
    out, bad = [], 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            bad += i < len(lines) - 1  # the last line may still be being written
            continue
        if isinstance(record, dict) and _well_typed(record):
            out.append(record)
        else:
            bad += 1
    if bad:
        logger.warning(
            "%s: %d line(s) that are not well-formed records (not UTF-8 JSON, or a value of "
            "the wrong type) are left out",
            short_repr(str(path)),
            bad,
        )
    return out


def _well_typed(record: dict[str, Any]) -> bool:
    """``step`` an int, ``split`` a string, and every other value a number, string or null."""
    step, split = record.get("step", 0), record.get("split", "")
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(split, str):
        return False
    return all(
        v is None or isinstance(v, (str, float)) or (isinstance(v, int) and abs(v) < 1 << 63)
        for v in record.values()
    )


def _count_parameters(path: Path) -> int | None:
    """Parameters of the run's model, counted from its config (no memory, no data)."""
    from moglstm.lm.config import from_dict
    from moglstm.lm.data import Vocab
    from moglstm.lm.models import parameter_count

    for name in ("best.pt", "last.pt"):
        try:
            payload = _load_for_config(path / name)
            cfg, vocab = from_dict(payload["config"]), Vocab.from_dict(payload["vocab"])
            return parameter_count(cfg.model, len(vocab))
        except Exception as exc:  # missing, being replaced, or unreadable: try the other
            logger.debug("no parameter count from %s: %s", path / name, exc)
    return None


def _saved_elapsed(path: Path) -> float | None:
    """``elapsed`` of the run's last.pt (only its counters are read), or None."""
    try:
        elapsed = _load_for_config(path / "last.pt")["counters"]["elapsed"]
    except Exception as exc:  # missing, being replaced, or unreadable: the log lines tell
        logger.debug("no elapsed time from %s: %s", path / "last.pt", exc)
        return None
    ok = isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
    return float(elapsed) if ok and math.isfinite(elapsed) and elapsed >= 0 else None


def _load_for_config(path: Path) -> Any:
    """A checkpoint opened by the run-folder opener (a FIFO or link is refused at once)
    and memory-mapped where the platform allows: only its config and vocab are read."""
    with open_run_file(path) as f:
        by_fd = f"/proc/self/fd/{f.fileno()}"  # the very file checked, mapped by name
        if os.path.exists(by_fd):
            return torch.load(by_fd, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(f, map_location="cpu", weights_only=True)


def _is_running(path: Path) -> bool:
    """Whether a process holds the run's lock (see :mod:`moglstm.lm.runlock`)."""
    from moglstm.lm.runlock import is_locked

    return is_locked(path)


# --------------------------------------------------------------------------- the table


def config_differences(runs: Sequence[RunRecord]) -> list[str]:
    """The dotted config keys whose values are not the same in all ``runs``."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys and k not in _IGNORED_KEYS]
    return [k for k in keys if len({repr(r.config.get(k)) for r in runs}) > 1]


def sort_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """Best first: by best validation loss (runs without a validation last), then name."""
    return sorted(runs, key=lambda r: (r.objective is None, r.objective or 0.0, r.name))


def run_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One flat dict per run, best first: what ``--csv``/``--json`` export.

    Keys: ``run``, ``path``, ``state`` (see :attr:`RunRecord.status`), ``step``,
    ``objective`` (best validation loss), ``best_valid_<ppl|bpc>``, ``best_step``,
    ``final_valid_<ppl|bpc>``, ``test_<ppl|bpc>``, ``params``, ``tokens_per_s``,
    ``elapsed`` (seconds), ``study``, ``trial``, ``trial_state`` (Optuna's, for a
    study's trial), then the config keys in which the runs differ.
    """
    differing = config_differences(runs)
    rows = []
    for run in sort_runs(runs):
        metric, best = run.metric, run.best_valid
        final = run.valid[-1] if run.valid else None
        trial = run.trial or {}
        test = run.test
        test_metric = None if test is None else ("bpc" if "bpc" in test else "ppl")
        rows.append(
            {
                "run": run.name,
                "path": str(run.path),
                "state": run.status,
                "step": run.step,
                "objective": run.objective,
                f"best_valid_{metric}": None if best is None else best.get(metric),
                "best_step": None if best is None else best.get("step"),
                f"final_valid_{metric}": None if final is None else final.get(metric),
                f"test_{test_metric or metric}": None if test is None else test.get(test_metric),
                "params": run.params,
                "tokens_per_s": run.tokens_per_s,
                "elapsed": run.elapsed,
                "study": trial.get("study"),
                "trial": trial.get("number"),
                "trial_state": trial.get("state"),
                **{k: run.config.get(k) for k in differing},
            }
        )
    # JSON has no inf or NaN (a diverged run's perplexity): they are exported as null
    return [{k: _finite_or_none(v) for k, v in row.items()} for row in rows]


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`run_rows` as CSV, the union of their keys as columns (in first-seen order)."""
    import csv
    import io

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return out.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def markdown_table(runs: Sequence[RunRecord]) -> str:
    """One row per run, best validation first: state (and a study trial's Optuna state),
    differing config, parameters, validation, test, speed, time."""
    differing = config_differences(runs)
    studied = any(run.trial for run in runs)
    header = [
        "run",
        "state",
        "trial" if studied else None,
        "step",
        "config" if differing else None,
        "params",
        "best valid",
        "final valid",
        "test",
        "tokens/s",
        "time",
    ]
    header = [h for h in header if h is not None]
    rows = [header, ["---"] * len(header)]
    for run in sort_runs(runs):
        best, final = run.best_valid, (run.valid[-1] if run.valid else None)
        row = [
            run.name,
            run.status,
            _trial(run.trial) if studied else None,
            str(run.step),
            ", ".join(f"{k}={_short(run.config.get(k))}" for k in differing) if differing else None,
            _count(run.params),
            _score(best, run.metric, with_step=True),
            _score(final, run.metric),
            _test(run.test),
            "-" if run.tokens_per_s is None else f"{run.tokens_per_s:,.0f}",
            _duration(run.elapsed),
        ]
        rows.append([c for c in row if c is not None])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def _trial(trial: dict[str, Any] | None) -> str:
    """``"7 pruned"`` or ``"3 complete, loss 4.1234"`` (Optuna's number, state, value)."""
    if not trial:
        return "-"
    text = f"{trial['number']} {trial['state']}"
    value = trial.get("value")
    return text if value is None else f"{text}, loss {value:.4f}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _score(record: dict[str, Any] | None, metric: str, with_step: bool = False) -> str:
    if record is None or metric not in record:
        return "-"
    text = f"{metric} {record[metric]:.3f}" if metric == "bpc" else f"{metric} {record[metric]:.2f}"
    return f"{text} (step {record['step']})" if with_step else text


def _test(record: dict[str, Any] | None) -> str:
    if record is None:
        return "-"
    metric = "bpc" if "bpc" in record else "ppl"
    how = [f"batch {record.get('batch_size')}", f"{record.get('tokens', 0):,} tokens"]
    if record.get("dynamic"):
        how.append("dynamic")
    if record.get("temperature") not in (None, 1.0):
        how.append(f"T={record['temperature']:.2f}")
    if record.get("mc_samples"):
        how.append(f"MC {record['mc_samples']}")
    return f"{_score(record, metric)} ({', '.join(how)})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# --------------------------------------------------------------------------- the figure


HIGHLIGHTED = 8  # with more runs than ALL_NAMED, the best this many are named and coloured
ALL_NAMED = 12
LOAD_CAVEAT = (
    "wall-clock time depends on the machine's load: compare only runs made on the same,\n"
    "otherwise idle machine (tokens/s in the table shows the speed each run had)"
)


def plot_runs(runs: Sequence[RunRecord], title: str | None = None) -> Any:
    """A matplotlib figure of 2 x 2 panels: validation metric (top) and training loss
    (bottom), against steps (left) and wall-clock time (right), one line per run.

    Up to :data:`ALL_NAMED` runs each get a colour of their own and a legend entry
    (outside the panels, best first); with more (a study's trials), the best
    :data:`HIGHLIGHTED` do and the rest are drawn faint grey as one entry. Colours
    never repeat. A panel with nothing to draw yet says so; the wall-clock panels
    carry the caveat that they compare machine load as much as runs.

    Runs of mixed levels (perplexity and bits per character) are drawn as validation
    loss in nats per token instead.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    require("matplotlib", "plot", "the report's figure")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    metrics = {run.metric for run in runs}
    metric = metrics.pop() if len(metrics) == 1 else "loss"
    label = {"ppl": "validation perplexity", "bpc": "validation bits per character"}.get(
        metric, "validation loss (nats/token)"
    )
    ordered = sort_runs(runs)
    named = ordered if len(ordered) <= ALL_NAMED else ordered[:HIGHLIGHTED]
    colours = _colours(len(named))
    fig = Figure(figsize=(12.5, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharey="row")
    drawn = [[0, 0], [0, 0]]
    faint = ordered[len(named) :]
    for run, colour in [*zip(named, colours, strict=True), *((r, None) for r in faint)]:
        style_of_run = (
            {"color": colour, "zorder": 3}
            if colour is not None
            else {"color": "0.6", "alpha": 0.35, "zorder": 1}
        )
        for row, (records, key) in enumerate(((run.valid, metric), (run.train, "loss"))):
            points = [r for r in records if key in r and math.isfinite(r[key])]
            ys = [r[key] for r in points]
            for col, xkey in enumerate(("step", "elapsed")):
                xs = [r.get(xkey, math.nan) / (60 if xkey == "elapsed" else 1) for r in points]
                style = {"marker": "o", "markersize": 3} if row == 0 else {"linewidth": 1}
                if colour is None:
                    style = {"linewidth": 0.8}
                axes[row][col].plot(xs, ys, **style_of_run, **style)
                drawn[row][col] += bool(points)
    empty = ("no validation yet", "no training loss logged yet")
    for row, ylabel in enumerate((label, "training loss (nats/token)")):
        axes[row][0].set_ylabel(ylabel)
        for col, xlabel in enumerate(("step", "wall-clock time (minutes)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            if not drawn[row][col]:
                ax.text(
                    0.5,
                    0.5,
                    empty[row],
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="0.4",
                )
                ax.tick_params(labelbottom=False, labelleft=False, length=0)
                ax.grid(False)
    axes[0][1].set_title(LOAD_CAVEAT, fontsize="small", color="0.35")
    if metric == "ppl" and any(drawn[0]):
        from matplotlib import ticker

        axis = axes[0][0].yaxis  # shared with the time panel
        axes[0][0].set_yscale("log")
        # plain numbers (300, not 3 x 10^2), minor ticks labelled across small ranges
        axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
        minor = ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        axis.set_minor_formatter(minor)
    _legend(fig, named, colours, faint, metric)
    if title:
        fig.suptitle(title)
    return fig


def _colours(n: int) -> list[Any]:
    """``n`` distinct colours, none of them the grey of the faint runs: tab10 without its
    grey for up to 9, else evenly spaced along the turbo colour map."""
    from matplotlib import colormaps

    if n <= 9:
        tab = colormaps["tab10"]
        return [tab(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)[:n]]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def _legend(fig: Any, named: list[RunRecord], colours: list[Any], faint: list, metric: str) -> None:
    """Outside the panels, on the right: the named runs best first, with their best score."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for run, colour in zip(named, colours, strict=True):
        handles.append(Line2D([], [], color=colour, marker="o", markersize=3))
        best = run.best_valid
        score = "" if best is None or metric not in best else f"  {_format(best[metric], metric)}"
        state = "" if run.status == "done" else f" ({run.status})"
        labels.append(f"{run.name}{score}{state}")
    if faint:
        handles.append(Line2D([], [], color="0.6", alpha=0.5))
        labels.append(f"{len(faint)} more runs (faint)")
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            fontsize="small",
            title=f"best {metric} first" if metric != "loss" else "best first",
        )


def _format(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric in ("bpc", "loss") else f"{value:.2f}"


# --------------------------------------------------------------------------- report


def report(
    runs: Sequence[str | Path],
    out: str | Path | None = "report",
    *,
    plot: bool = True,
    title: str | None = None,
    csv: bool = False,
    json_file: bool = False,
) -> dict[str, Any]:
    """Compare runs: write the figure (PNG and SVG) and the markdown table.

    Args:
        runs: run folders, or folders of run folders (see :func:`find_runs`).
        out: path prefix of the files written: ``<out>.png``, ``<out>.svg`` and
            ``<out>.md``; ``None`` writes nothing (the table is still returned).
        plot: draw the figure (needs matplotlib); ``False`` for the table alone.
        title: the figure's title.
        csv: also write ``<out>.csv``, one row per run (:func:`run_rows`).
        json_file: also write ``<out>.json``, the same rows as a JSON list.

    Returns:
        ``{"runs": [RunRecord...], "rows": [dict...], "table": str, "files": [paths
        written]}``, the runs and rows best first.

    Raises:
        FileNotFoundError: a run folder is missing.
        MissingExtraError: ``plot`` but matplotlib is not installed (checked first).
    """
    if plot:
        require("matplotlib", "plot", "the report's figure (or use --no-plot)")
    records = sort_runs([read_run(p) for p in find_runs(runs)])
    table = markdown_table(records)
    rows = run_rows(records)
    files: list[Path] = []
    if out is not None:
        prefix = Path(out).expanduser()
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if plot:
            fig = plot_runs(records, title)
            for fmt in FIGURE_FORMATS:
                path = prefix.with_name(f"{prefix.name}.{fmt}")
                fig.savefig(path, dpi=120)
                files.append(path)
        exports = {"md": table}
        if csv:
            exports["csv"] = rows_csv(rows)
        if json_file:
            exports["json"] = json.dumps(rows, indent=1) + "\n"
        for suffix, text in exports.items():
            path = prefix.with_name(f"{prefix.name}.{suffix}")
            path.write_text(text, encoding="utf-8")
            files.append(path)
    return {"runs": records, "rows": rows, "table": table, "files": files}
