"""Reports on training runs: learning curves in one figure and a markdown table.

:func:`read_run` gathers what a run folder holds (``config.yaml``,
``metrics.jsonl``, ``evaluations.jsonl``, a checkpoint for the parameter count),
tolerating a run still in progress (a half-written last line, no checkpoint yet).
:func:`report` compares one or several runs::

    moglstm report runs/ptb-small runs/ptb-small-lstm --out ptb-small

writes ``ptb-small.png`` and ``ptb-small.svg`` (validation perplexity or bits per
character and training loss, against steps and against wall-clock time) and
``ptb-small.md`` (the table, also printed): per run its status, the config keys in
which the runs differ, the parameter count, best and final validation, the latest
test evaluation (``moglstm evaluate --split test`` records it in the run folder),
the training speed and the time spent.

The figure needs matplotlib (``pip install 'moglstm[plot]'``); the table does not.
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
from moglstm.lm.runs.folder import EVALUATIONS_FILE
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
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    params: int | None = None
    running: bool = False

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
        """``running``, ``done`` (reached ``train.max_steps``) or ``stopped`` (before it:
        interrupted, crashed or stopped early)."""
        if self.running:
            return "running"
        max_steps = self.config.get("train.max_steps")
        if max_steps is not None and self.step >= max_steps:
            return "done"
        return "stopped"


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
    run.running = _is_running(path)
    return run


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


def markdown_table(runs: Sequence[RunRecord]) -> str:
    """One row per run: status, differing config, parameters, validation, test, speed, time."""
    differing = config_differences(runs)
    header = [
        "run",
        "status",
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
    for run in runs:
        best, final = run.best_valid, (run.valid[-1] if run.valid else None)
        row = [
            run.name,
            run.status,
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


def plot_runs(runs: Sequence[RunRecord], title: str | None = None) -> Any:
    """A matplotlib figure of 2 x 2 panels: validation metric (top) and training loss
    (bottom), against steps (left) and wall-clock time (right), one line per run.

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
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharey="row")
    for run in runs:
        colour = None
        for row, (records, key) in enumerate(((run.valid, metric), (run.train, "loss"))):
            points = [r for r in records if key in r and math.isfinite(r[key])]
            ys = [r[key] for r in points]
            for col, xkey in enumerate(("step", "elapsed")):
                xs = [r.get(xkey, math.nan) / (60 if xkey == "elapsed" else 1) for r in points]
                style = {"marker": "o", "markersize": 3} if row == 0 else {"linewidth": 1}
                (line,) = axes[row][col].plot(xs, ys, color=colour, label=run.name, **style)
                colour = line.get_color()
    for row, ylabel in enumerate((label, "training loss (nats/token)")):
        axes[row][0].set_ylabel(ylabel)
        for col, xlabel in enumerate(("step", "wall-clock time (minutes)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
    if metric == "ppl":
        from matplotlib import ticker

        axis = axes[0][0].yaxis  # shared with the time panel
        axes[0][0].set_yscale("log")
        # plain numbers (300, not 3 x 10^2), minor ticks labelled across small ranges
        axis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
        minor = ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        axis.set_minor_formatter(minor)
    if len(runs) <= 20:  # more (a study's trials) read as a cloud, not by name
        axes[0][1].legend(fontsize="small", ncol=2 if len(runs) > 8 else 1)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- report


def report(
    runs: Sequence[str | Path],
    out: str | Path | None = "report",
    *,
    plot: bool = True,
    title: str | None = None,
) -> dict[str, Any]:
    """Compare runs: write the figure (PNG and SVG) and the markdown table.

    Args:
        runs: run folders, or folders of run folders (see :func:`find_runs`).
        out: path prefix of the files written: ``<out>.png``, ``<out>.svg`` and
            ``<out>.md``; ``None`` writes nothing (the table is still returned).
        plot: draw the figure (needs matplotlib); ``False`` for the table alone.
        title: the figure's title.

    Returns:
        ``{"runs": [RunRecord...], "table": str, "files": [paths written]}``.

    Raises:
        FileNotFoundError: a run folder is missing.
        MissingExtraError: ``plot`` but matplotlib is not installed (checked first).
    """
    if plot:
        require("matplotlib", "plot", "the report's figure (or use --no-plot)")
    records = [read_run(p) for p in find_runs(runs)]
    table = markdown_table(records)
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
        path = prefix.with_name(f"{prefix.name}.md")
        path.write_text(table, encoding="utf-8")
        files.append(path)
    return {"runs": records, "table": table, "files": files}
