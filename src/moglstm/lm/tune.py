"""Hyperparameter search on Optuna: every trial a normal training run.

A *search space* is a YAML file (or a shipped one: ``moglstm tune --list``)::

    preset: ptb-small                 # the base config (optional)
    overrides: [train.max_steps=3000] # dotted overrides on top (optional)
    space:                            # dotted config keys and how to draw them
      train.lr: {logfloat: [1.0e-4, 1.0e-2]}
      model.input_dropout: {float: [0.0, 0.9]}
      model.mogrify_rounds: {int: [0, 6]}
      model.mogrify_rank: {logint: [8, 128]}
      data.bptt: {choice: [35, 70]}

Kinds: ``float`` and ``logfloat`` (uniform, log-uniform), ``int`` and ``logint``, and
``choice`` (a list of any YAML values). A study lives in ``<out_dir>/<study>/``:
``study.db`` (the SQLite storage, unless ``--storage`` names another database) and
one run folder per trial, ``trial-0007/``, made by :func:`moglstm.lm.train.train`
(curves, checkpoints, ``moglstm report``-able). The objective is the trial's best
validation loss; poor trials are pruned from their validation curve (median or
Hyperband pruner, one report per validation).

Resuming and parallel workers: the same command again continues the study (the
trial budget is the study's total); several processes, on one machine or many
(through a PostgreSQL or MySQL ``--storage``), run trials of one study at once.
Every worker beats a heartbeat into the storage, so a trial whose worker was
killed is marked failed once its heartbeat goes stale, and the next worker retries
it with the same parameters, resuming its run folder from ``last.pt`` when it is
reachable.

``--dynamic RUN`` tunes dynamic evaluation's settings (the space's ``dynamic.*``
keys: ``lr``, ``decay``, ``eps``, ``bptt``, ``grad_batches``) of a trained run on its
validation split instead; the study lives in the run folder (``dynamic.db``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moglstm.lm.config import RunConfig, apply_overrides, load_preset, validate
from moglstm.lm.safety import check_regular_or_absent, load_yaml, load_yaml_file, short_repr

__all__ = [
    "COMMAND",
    "PARAM_KINDS",
    "PRUNERS",
    "Param",
    "SearchSpace",
    "add_arguments",
    "command",
    "list_spaces",
    "load_space",
    "tune",
    "tune_dynamic",
]

logger = logging.getLogger(__name__)

PARAM_KINDS = ("float", "logfloat", "int", "logint", "choice")
PRUNERS = ("median", "hyperband", "none")
DYNAMIC_KEYS = ("lr", "decay", "eps", "bptt", "grad_batches")  # of DynamicEvalSettings
_SPACE_KEYS = ("preset", "overrides", "space")
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# --------------------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Param:
    """One dimension of a search space: a dotted config key and how to draw its value."""

    key: str
    kind: str
    values: tuple[Any, ...]  # (low, high) for numbers, the options for choice

    def __post_init__(self) -> None:
        where = f"search space key {short_repr(self.key)}"
        if self.kind not in PARAM_KINDS:
            raise ValueError(
                f"{where}: kind {short_repr(self.kind)} is not one of: {', '.join(PARAM_KINDS)}"
            )
        if self.kind == "choice":
            if not self.values:
                raise ValueError(f"{where}: choice needs a non-empty list of values")
            return
        if len(self.values) != 2:
            raise ValueError(
                f"{where}: {self.kind} needs [low, high], got {short_repr(list(self.values))}"
            )
        low, high = self.values
        number = int if self.kind.endswith("int") else (int, float)
        for v in (low, high):
            if isinstance(v, bool) or not isinstance(v, number):
                raise ValueError(
                    f"{where}: {self.kind} bounds must be numbers, got {short_repr(v)}"
                )
        if not low <= high:
            raise ValueError(f"{where}: low {short_repr(low)} is above high {short_repr(high)}")
        if self.kind.startswith("log") and low <= 0:
            raise ValueError(f"{where}: {self.kind} needs low > 0, got {low!r}")

    def suggest(self, trial: Any) -> Any:
        """Draw a value with an ``optuna.Trial``."""
        if self.kind == "choice":
            # Optuna stores choices as plain values; lists/dicts travel as JSON text
            options = [v if _is_scalar(v) else json.dumps(v) for v in self.values]
            picked = trial.suggest_categorical(self.key, options)
            return self.values[options.index(picked)]
        low, high = self.values
        log = self.kind.startswith("log")
        if self.kind.endswith("int"):
            return trial.suggest_int(self.key, low, high, log=log)
        return trial.suggest_float(self.key, float(low), float(high), log=log)

    def extremes(self) -> list[Any]:
        """The values a space check tries: the bounds, or every choice."""
        return list(self.values)


@dataclass
class SearchSpace:
    """A search space: the base config (preset and overrides) and the :class:`Param`\\ s."""

    params: list[Param]
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    name: str = "tune"

    def base_config(self, overrides: list[str] = ()) -> RunConfig:
        """The config every trial starts from (not validated)."""
        from moglstm.lm.config import RunConfig

        cfg = RunConfig() if self.preset is None else load_preset(self.preset)
        return apply_overrides(cfg, [*self.overrides, *overrides])


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _spaces_folder() -> Any:
    return resources.files("moglstm.lm") / "spaces"


def list_spaces() -> list[str]:
    """Names of the shipped search spaces (``moglstm/lm/spaces/*.yaml``), sorted."""
    return sorted(
        e.name[: -len(".yaml")] for e in _spaces_folder().iterdir() if e.name.endswith(".yaml")
    )


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read a search space: a shipped name (see :func:`list_spaces`) or a YAML file.

    Raises:
        ValueError: the file is malformed: unknown top-level keys, a kind not in
            :data:`PARAM_KINDS`, bad bounds.
        FileNotFoundError: no such file.
    """
    text = str(name_or_path)
    if text in list_spaces():
        resource = _spaces_folder() / f"{text}.yaml"
        raw, label = resource.read_text(encoding="utf-8"), f"search space {text!r}"
        name = text
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"search space {short_repr(text)} not found: give a YAML file or a shipped space "
                f"({', '.join(list_spaces())})"
            )
        label, name = f"search space file {short_repr(text)}", path.stem
        raw = None
    # no aliases, at most MAX_YAML_BYTES, errors that never quote the file (issue 11)
    data = load_yaml(raw, label) if raw is not None else load_yaml_file(path, label)
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict) or not data["space"]:
        raise ValueError(f"{label} must be a mapping with a non-empty 'space:' mapping")
    unknown = sorted(set(data) - set(_SPACE_KEYS))
    if unknown:
        raise ValueError(
            f"{label}: unknown key(s) {short_repr(unknown)}; allowed: {', '.join(_SPACE_KEYS)}"
        )
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError(f"{label}: overrides must be a list of KEY=VALUE strings")
    params = [_param(str(key), spec, label) for key, spec in data["space"].items()]
    return SearchSpace(params, data.get("preset"), list(overrides), name)


def _param(key: str, spec: Any, label: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(
            f"{label}: {short_repr(key)} must be one of {{kind: values}} with kind in "
            f"{', '.join(PARAM_KINDS)}, e.g. {{logfloat: [1.0e-4, 1.0e-2]}}; got {short_repr(spec)}"
        )
    ((kind, values),) = spec.items()
    if not isinstance(values, list):
        raise ValueError(
            f"{label}: {short_repr(key)}: {short_repr(kind)} takes a list, got {short_repr(values)}"
        )
    if kind in ("float", "logfloat"):  # YAML reads 1e-5 (no dot) as a string
        values = [_number(v) for v in values]
    return Param(key, str(kind), tuple(values))


def _number(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _apply(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``cfg`` with the dotted keys set to ``values`` (JSON text is valid YAML)."""
    return apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in values.items()])


def check_space(space: SearchSpace, base: RunConfig) -> None:
    """Fail early on keys the config lacks and bounds it rejects (each value alone)."""
    validate(base)
    for param in space.params:
        for value in param.extremes():
            try:
                validate(_apply(base, {param.key: value}))
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"search space key {short_repr(param.key)} = {short_repr(value)}: {exc}"
                ) from None


# --------------------------------------------------------------------------- optuna plumbing


def _optuna() -> Any:
    from moglstm.lm.report import require

    optuna = require("optuna", "tune", "moglstm tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _storage(optuna: Any, url: str, heartbeat: int) -> Any:
    """An RDB storage beating a heartbeat (stale trials retried), or ``url`` as Optuna takes it."""
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        return url
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(1, 6):  # the 5th failure is raised
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                **{_retry_keyword(optuna): _retry_class(optuna)(max_retry=2)},
            )
        except Exception as exc:
            # workers started together race to create the tables: the loser tries again
            if attempt == 5 or not type(exc).__module__.startswith("sqlalchemy"):
                raise
            logger.debug("storage %s not ready (%s); retrying", url, exc)
            time.sleep(0.2 * attempt)


def _retry_class(optuna: Any) -> Any:
    """Optuna's callback that re-queues a stale trial (renamed in Optuna 4.9)."""
    storages = optuna.storages
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or (
        storages.RetryFailedTrialCallback
    )


def _retry_keyword(optuna: Any) -> str:
    new = hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
    return "heartbeat_stale_trial_callback" if new else "failed_trial_callback"


def _retried_number(optuna: Any, study: Any, trial: Any) -> int | None:
    """The number of the trial that ``trial`` retries, or ``None``."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    return _retry_class(optuna).retried_trial_number(frozen)


def _pruner(optuna: Any, kind: str, startup: int, cfg: RunConfig | None) -> Any:
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if kind == "hyperband":
        t = cfg.train
        return optuna.pruners.HyperbandPruner(min_resource=t.eval_every, max_resource=t.max_steps)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner={kind!r} is not one of: {', '.join(PRUNERS)}")


def parse_duration(text: str | float | None) -> float | None:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1.5d"`` -> seconds (``None`` stays)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = _DURATION.fullmatch(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"time budget {text!r}: give a positive number of s, m, h or d (30m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _budget(trials: int | None, timeout: float | str | None) -> float | None:
    """Check the budgets; return the time budget in seconds."""
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int)):
        raise TypeError(f"trials: expected an int, got {trials!r}")
    if trials is not None and trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    if trials is None and timeout is None:
        raise ValueError("give a trial budget (--trials N), a time budget (--timeout 2h) or both")
    return parse_duration(timeout)


def _finished(study: Any, optuna: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=_counted(optuna)))


def _run_study(
    optuna: Any,
    study: Any,
    objective: Callable[[Any], float],
    trials: int | None,
    timeout: float | None,
    catch: tuple[type[Exception], ...],
) -> None:
    """Optimize until the study has ``trials`` finished ones (all workers) or time is up."""
    callbacks = [_log_trial]
    remaining = None
    logger.info(
        "study %r: %d finished trials so far; budget: %s trials, %s",
        study.study_name,
        _finished(study, optuna),
        "no limit on" if trials is None else trials,
        "no time limit" if timeout is None else f"{timeout:.0f} s",
    )
    if trials is not None:
        remaining = trials - _finished(study, optuna)
        if remaining <= 0:
            logger.info("the study already has %d finished trials", _finished(study, optuna))
            return
        callbacks.append(optuna.study.MaxTrialsCallback(trials, states=_counted(optuna)))
    study.optimize(objective, n_trials=remaining, timeout=timeout, catch=catch, callbacks=callbacks)


def _counted(optuna: Any) -> tuple[Any, ...]:
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _log_trial(study: Any, trial: Any) -> None:
    attrs = trial.user_attrs
    scores = [f"{k.removeprefix('best_')} {v:.4g}" for k, v in attrs.items() if k != "run_dir"]
    value = "" if trial.value is None else f": loss {trial.value:.4f}"
    value += f" ({', '.join(scores)})" if scores and value else ""
    logger.info("trial %d %s%s %s", trial.number, trial.state.name.lower(), value, trial.params)


@contextlib.contextmanager
def _quiet_training() -> Iterator[None]:
    """Only warnings from the training loop: a study logs one line per trial instead."""
    loggers = [logging.getLogger(n) for n in ("moglstm.lm.train", "moglstm.lm.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _summary(study: Any, optuna: Any, extra: dict[str, Any]) -> dict[str, Any]:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    out: dict[str, Any] = {
        "study": study.study_name,
        **extra,
        **{s.name.lower(): sum(t.state == s for t in trials) for s in states},
    }
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return {**out, "best_trial": None}
    return {
        **out,
        "best_trial": best.number,
        "best_value": best.value,
        **{k: v for k, v in best.user_attrs.items()},
        "best_params": best.params,
    }


# --------------------------------------------------------------------------- training trials


class _ValidationReporter:
    """``train``'s ``on_step``: after each validation, report it and maybe prune."""

    def __init__(self, trial: Any, run_dir: Path, eval_every: int, pruned: type[Exception]):
        self.trial, self.metrics, self.eval_every, self.pruned = trial, run_dir, eval_every, pruned

    def __call__(self, step: int, _: dict[str, float]) -> None:
        if step % self.eval_every:
            return
        record = _last_validation(self.metrics / "metrics.jsonl", step)
        if record is None or not math.isfinite(record["loss"]):
            return
        self.trial.report(record["loss"], step)
        if self.trial.should_prune():
            raise self.pruned(f"pruned at step {step} (validation loss {record['loss']:.4f})")


def _last_validation(path: Path, step: int) -> dict[str, Any] | None:
    from moglstm.lm.report import read_jsonl

    for record in reversed(read_jsonl(path)):
        if record.get("split") == "valid" and record.get("step") == step:
            return record
    return None


def tune(
    space: SearchSpace | str | Path,
    *,
    overrides: list[str] = (),
    trials: int | None = None,
    timeout: float | str | None = None,
    study: str | None = None,
    out_dir: str | Path = "runs/tune",
    storage: str | None = None,
    pruner: str = "median",
    prune_startup: int = 5,
    seed: int | None = None,
    heartbeat: int = 60,
) -> dict[str, Any]:
    """Run (or continue, or join) a study of training runs; return its summary.

    Args:
        space: a :class:`SearchSpace`, or a shipped name / YAML path for :func:`load_space`.
        overrides: dotted ``key=value`` items applied to every trial (after the space's
            own ``overrides``), e.g. ``train.max_steps=2000``.
        trials: stop when the study has this many finished (complete or pruned) trials,
            counting every worker's and earlier sessions'.
        timeout: stop starting trials after this long (seconds, or ``"30m"``, ``"2h"``).
        study: the study's name (default: the space's); its folder is
            ``<out_dir>/<study>/``.
        storage: an Optuna storage URL (``postgresql://user:pw@host/db``,
            ``mysql+pymysql://...``); default ``sqlite:///<out_dir>/<study>/study.db``.
        pruner: ``median``, ``hyperband`` or ``none``.
        prune_startup: trials that run to the end before the median pruner prunes.
        seed: the sampler's seed (give each worker its own, or none).
        heartbeat: seconds between a worker's heartbeats; a trial whose worker is
            silent for twice that is failed and retried.

    Returns:
        ``{"study", "study_dir", "storage", "complete", "pruned", "fail", "running",
        "best_trial", "best_value" (validation loss), "best_<ppl|bpc>", "run_dir",
        "best_params"}``.
    """
    seconds = _budget(trials, timeout)
    optuna = _optuna()
    from moglstm.lm.runlock import RunLockedError
    from moglstm.lm.train import NonFiniteLossError

    space = space if isinstance(space, SearchSpace) else load_space(space)
    base = space.base_config(list(overrides))
    check_space(space, base)
    study_name = study or space.name
    study_dir = Path(out_dir).expanduser() / study_name
    storage = storage or f"sqlite:///{study_dir / 'study.db'}"
    study_obj = optuna.create_study(
        study_name=study_name,
        storage=_storage(optuna, storage, heartbeat),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=_pruner(optuna, pruner, prune_startup, validate(base)),
        direction="minimize",
        load_if_exists=True,
    )

    def objective(trial: Any) -> float:
        retried = _retried_number(optuna, study_obj, trial)
        number = trial.number if retried is None else retried
        run_dir = study_dir / f"trial-{number:04d}"
        values = {p.key: p.suggest(trial) for p in space.params}
        resume = retried is not None and (run_dir / "last.pt").is_file()
        if resume:
            from moglstm.lm.train import resume_config

            cfg = resume_config(run_dir)
            logger.info("trial %d: resuming %s (retry of trial %d)", trial.number, run_dir, retried)
        else:
            cfg = _apply(base, values)
            cfg.name, cfg.out_dir = run_dir.name, str(study_dir)
            if retried is not None and run_dir.exists():  # failed before its first checkpoint
                run_dir = study_dir / f"trial-{trial.number:04d}"
                cfg.name = run_dir.name
        trial.set_user_attr("run_dir", str(run_dir))
        reporter = _ValidationReporter(trial, run_dir, cfg.train.eval_every, optuna.TrialPruned)
        from moglstm.lm.train import train

        with _quiet_training():
            results = train(cfg, resume=resume, quiet=True, on_step=reporter)
        metric = "bpc" if "best_valid_bpc" in results else "ppl"
        trial.set_user_attr(f"best_{metric}", results[f"best_valid_{metric}"])
        return results["best_valid_loss"]

    _run_study(
        optuna,
        study_obj,
        objective,
        trials,
        seconds,
        (NonFiniteLossError, RunLockedError, ValueError),
    )
    return _summary(study_obj, optuna, {"study_dir": str(study_dir), "storage": storage})


# --------------------------------------------------------------------------- dynamic evaluation


def tune_dynamic(
    run: str | Path,
    space: SearchSpace | str | Path = "dynamic",
    *,
    trials: int | None = None,
    timeout: float | str | None = None,
    study: str | None = None,
    storage: str | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    checkpoint: str = "best",
    device: str = "auto",
    seed: int | None = None,
    heartbeat: int = 60,
) -> dict[str, Any]:
    """Tune dynamic evaluation's settings of a trained run on its validation split.

    The space's keys are ``dynamic.<field>`` of
    :class:`~moglstm.lm.dynamic_eval.DynamicEvalSettings` (others keep their defaults).
    The model is loaded once and the mean squared training gradients computed once
    per ``grad_batches`` value; each trial scores the validation split (its first
    ``max_tokens`` tokens) with ``batch_size`` streams (default: the run's
    ``data.eval_batch_size``; 1 is the paper's protocol, and slowest).

    Returns:
        The study's summary (see :func:`tune`), with ``best_<ppl|bpc>`` and the
        ``evaluate`` command line of the best settings.
    """
    seconds = _budget(trials, timeout)
    optuna = _optuna()
    from moglstm.lm.data import batchify, load_corpus
    from moglstm.lm.dynamic_eval import DynamicEvalSettings, dynamic_evaluate, gradient_statistics
    from moglstm.lm.evaluate import load_run, metrics_for

    space = space if isinstance(space, SearchSpace) else load_space(space)
    for p in space.params:
        if p.key.partition(".")[0] != "dynamic" or p.key.partition(".")[2] not in DYNAMIC_KEYS:
            raise ValueError(
                f"search space key {p.key!r}: dynamic evaluation tunes "
                f"{', '.join('dynamic.' + k for k in DYNAMIC_KEYS)}"
            )
        for value in p.extremes():  # DynamicEvalSettings checks each value
            DynamicEvalSettings(**{p.key.partition(".")[2]: value})
    loaded = load_run(run, checkpoint, device)
    run_dir = loaded.checkpoint.parent
    cfg = loaded.config
    corpus = load_corpus(cfg.data, vocab=loaded.vocab)
    target = next(loaded.model.parameters()).device
    valid = batchify(corpus.valid, batch_size or cfg.data.eval_batch_size).to(target)
    train_data = batchify(corpus.train, cfg.data.batch_size).to(target)
    stats: dict[int | None, Any] = {}

    def objective(trial: Any) -> float:
        values = {p.key.partition(".")[2]: p.suggest(trial) for p in space.params}
        settings = DynamicEvalSettings(**values)
        if settings.grad_batches not in stats:
            stats[settings.grad_batches] = gradient_statistics(
                loaded.model, train_data, cfg.data.bptt, max_batches=settings.grad_batches
            )
        loss, _ = dynamic_evaluate(
            loaded.model, valid, stats[settings.grad_batches], settings, max_tokens=max_tokens
        )
        if not math.isfinite(loss):
            raise optuna.TrialPruned(f"diverged (loss {loss})")
        name, value = next(iter(metrics_for(loss, corpus.level).items() - {("loss", loss)}))
        trial.set_user_attr(f"best_{name}", value)
        return loss

    study_name = study or "dynamic"
    if storage is None and (Path(study_name).name != study_name or study_name in (".", "..")):
        raise ValueError(f"study={short_repr(study_name)}: give a name, not a path")
    if storage is None:  # in the run folder: SQLite would follow a planted link out of it
        storage = f"sqlite:///{check_regular_or_absent(run_dir / (study_name + '.db'))}"
    study_obj = optuna.create_study(
        study_name=study_name,
        storage=_storage(optuna, storage, heartbeat),
        sampler=optuna.samplers.TPESampler(seed=seed),
        direction="minimize",
        load_if_exists=True,
    )
    _run_study(optuna, study_obj, objective, trials, seconds, ())
    out = _summary(study_obj, optuna, {"run_dir": str(run_dir), "storage": storage})
    if out["best_trial"] is not None:
        flags = " ".join(
            f"--dynamic-{k.partition('.')[2].replace('_', '-')} {v}"
            for k, v in out["best_params"].items()
        )
        out["command"] = f"moglstm evaluate {run_dir} --split test --batch-size 1 --dynamic {flags}"
    return out


# --------------------------------------------------------------------------- command line

#: ``moglstm tune``'s help, description and epilog (see :mod:`moglstm.cli`).
COMMAND = (
    "hyperparameter search (Optuna)",
    "Search hyperparameters with Optuna: every trial is a training run in the study's "
    "folder, poor trials are pruned from their validation curve.",
    """\
SPACE is a shipped search space (--list) or a YAML file:
  preset: ptb-small                  # base config (optional)
  overrides: [train.max_steps=3000]  # optional
  space:
    train.lr: {logfloat: [1.0e-4, 1.0e-2]}
    model.input_dropout: {float: [0.0, 0.9]}
    model.mogrify_rounds: {int: [0, 6]}
    data.bptt: {choice: [35, 70]}
Kinds: float, logfloat, int, logint, choice. The study lives in
<out-dir>/<study>/: study.db (SQLite) and one run folder per trial
(trial-0007/, see `moglstm report`). Running the same command again resumes
the study; the trial budget counts every trial of the study. Run it in several
terminals for parallel workers sharing study.db, or on several machines sharing
a PostgreSQL/MySQL database: --storage postgresql://USER:PASSWORD@HOST/DB
(pip install psycopg2-binary; the same --study on each machine). A trial whose
worker died is retried (resuming its run folder) once its heartbeat is stale.

--dynamic RUN tunes dynamic evaluation (space 'dynamic' by default: dynamic.lr,
dynamic.decay) of a trained run on its validation split; the study is kept in
RUN/dynamic.db and the best settings are printed as an evaluate command.

examples:
  moglstm tune ptb-small --trials 20
  moglstm tune ptb-paper --trials 1000 --timeout 7d train.max_steps=30000
  moglstm tune my-space.yaml --trials 50 --pruner hyperband --study wide
  moglstm tune --dynamic runs/ptb-small --trials 30 --max-tokens 20000
""",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``moglstm tune``'s options."""
    p.add_argument("space", nargs="?", metavar="SPACE", help="shipped space name or YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--list", action="store_true", help="list the shipped search spaces")
    p.add_argument("--trials", type=int, metavar="N", help="the study's trial budget")
    p.add_argument("--timeout", metavar="TIME", help="time budget: 3600, 90m, 2h, 1d")
    p.add_argument("--study", metavar="NAME", help="study name (default: the space's)")
    p.add_argument("--out-dir", default="runs/tune", metavar="DIR", help="(default: runs/tune)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default: SQLite in the study)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="(default: median)")
    p.add_argument(
        "--prune-startup", type=int, default=5, metavar="N", help="unpruned trials first"
    )
    p.add_argument("--seed", type=int, metavar="S", help="sampler seed")
    p.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS", help=argparse.SUPPRESS)
    p.add_argument("--dynamic", metavar="RUN", help="tune dynamic evaluation of this run")
    p.add_argument("--batch-size", type=int, metavar="N", help="--dynamic: streams")
    p.add_argument("--max-tokens", type=int, metavar="N", help="--dynamic: validation tokens")
    p.add_argument("--device", default="auto", help="--dynamic: auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def command(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``moglstm tune``; return the study's summary (printed by the command line)."""
    if args.list:
        for name in list_spaces():
            space = load_space(name)
            keys = ", ".join(p.key for p in space.params)
            print(f"{name:<22} [{space.preset or 'defaults'}] {keys}")
        return None
    common = {"trials": args.trials, "timeout": args.timeout, "study": args.study}
    common |= {"storage": args.storage, "seed": args.seed, "heartbeat": args.heartbeat}
    if args.dynamic:
        if args.overrides:
            raise ValueError(f"--dynamic takes no config overrides, got {args.overrides}")
        result = tune_dynamic(
            args.dynamic,
            args.space or "dynamic",
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            device=args.device,
            **common,
        )
    else:
        if args.space is None:
            raise ValueError(f"give a search space: one of {', '.join(list_spaces())}, or a file")
        result = tune(
            args.space,
            overrides=args.overrides,
            out_dir=args.out_dir,
            pruner=args.pruner,
            prune_startup=args.prune_startup,
            **common,
        )
    return result
