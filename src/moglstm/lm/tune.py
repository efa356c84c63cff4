"""Hyperparameter search on Optuna: every trial a normal training run.

A *search space* is a YAML file (or a shipped one: ``moglstm tune --list``)::

    preset: ptb-small                 # the base config (optional)
    overrides: [train.max_steps=3000] # dotted overrides on top (optional)
    space:                            # dotted config keys and how to draw them
      train.lr: {logfloat: [1.0e-4, 1.0e-2]}
      model.input_dropout: {float: [0.0, 0.9]}
      model.mogrifier.rounds: {int: [0, 6]}
      model.mogrifier.rank: {logint: [8, 128]}
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

Stopping: the first SIGINT/SIGTERM ends the study after the running trial has saved
its checkpoint; that trial is marked failed (its loss is no result) and queued again,
so the same command resumes it from ``last.pt``. ``--trials`` is exact with several
workers: a trial past the budget is not run (see :meth:`_Session.start_trial`).

Why about 950 lines: the two searches share the Optuna plumbing (storage URLs and
drivers, heartbeats and retries, signals, pruners, budgets, the table of trials),
which is most of the module; the command line that drives them is
:mod:`moglstm.cli.tune`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moglstm.lm import stopping
from moglstm.lm.config import RunConfig, apply_overrides, load_preset, validate
from moglstm.lm.errors import UserError
from moglstm.lm.safety import check_regular_or_absent, load_yaml, load_yaml_file, short_repr

__all__ = [
    "PARAM_KINDS",
    "PRUNERS",
    "Param",
    "SearchSpace",
    "list_spaces",
    "load_space",
    "tune",
    "tune_dynamic",
]

logger = logging.getLogger(__name__)

PARAM_KINDS = ("float", "logfloat", "int", "logint", "choice")
PRUNERS = ("median", "hyperband", "none")
PRUNE_WARMUP = 1  # validations before a trial may be pruned: the first one is too noisy
DYNAMIC_KEYS = ("lr", "decay", "eps", "bptt", "grad_batches")  # of DynamicEvalSettings
# training windows of the gradient statistics when the space does not tune grad_batches:
# the whole of a large corpus takes longer than the study (PTB: 1327 windows of 64 x 70)
DYNAMIC_GRAD_BATCHES = 200
_SPACE_KEYS = ("preset", "overrides", "space")


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
            raise UserError(
                f"{where}: kind {short_repr(self.kind)} is not one of: {', '.join(PARAM_KINDS)}"
            )
        if self.kind == "choice":
            if not self.values:
                raise UserError(f"{where}: choice needs a non-empty list of values")
            return
        if len(self.values) != 2:
            raise UserError(
                f"{where}: {self.kind} needs [low, high], got {short_repr(list(self.values))}"
            )
        low, high = self.values
        number = int if self.kind.endswith("int") else (int, float)
        for v in (low, high):
            if isinstance(v, bool) or not isinstance(v, number):
                raise UserError(
                    f"{where}: {self.kind} bounds must be numbers, got {short_repr(v)}"
                )
            if not math.isfinite(v):
                raise UserError(f"{where}: {self.kind} bound {v!r} is not finite")
        if not low <= high:
            raise UserError(f"{where}: low {short_repr(low)} is above high {short_repr(high)}")
        if self.kind.startswith("log") and low <= 0:
            raise UserError(f"{where}: {self.kind} needs low > 0, got {low!r}")

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
        raise UserError(f"{label} must be a mapping with a non-empty 'space:' mapping")
    unknown = sorted(set(data) - set(_SPACE_KEYS))
    if unknown:
        raise UserError(
            f"{label}: unknown key(s) {short_repr(unknown)}; allowed: {', '.join(_SPACE_KEYS)}"
        )
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{label}: overrides must be a list of KEY=VALUE strings")
    params = [_param(str(key), spec, label) for key, spec in data["space"].items()]
    return SearchSpace(params, data.get("preset"), list(overrides), name)


def _param(key: str, spec: Any, label: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(
            f"{label}: {short_repr(key)} must be one of {{kind: values}} with kind in "
            f"{', '.join(PARAM_KINDS)}, e.g. {{logfloat: [1.0e-4, 1.0e-2]}}; got {short_repr(spec)}"
        )
    ((kind, values),) = spec.items()
    if not isinstance(values, list):
        raise UserError(
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
                raise UserError(
                    f"search space key {short_repr(param.key)} = {short_repr(value)}: {exc}"
                ) from None


# --------------------------------------------------------------------------- optuna plumbing


def _optuna() -> Any:
    from moglstm.lm.report import require

    optuna = require("optuna", "tune", "moglstm tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# pip packages of the SQLAlchemy drivers a storage URL may name (``dialect+driver://``)
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pg8000": "pg8000",
    "asyncpg": "asyncpg",
    "pymysql": "PyMySQL",
    "mysqldb": "mysqlclient",
    "mysqlconnector": "mysql-connector-python",
    "mariadbconnector": "mariadb",
    "oracledb": "oracledb",
    "cx_oracle": "cx_Oracle",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def _storage(optuna: Any, url: str, heartbeat: int) -> Any:
    """An RDB storage of any SQLAlchemy URL, beating a heartbeat (stale trials retried).

    Raises:
        UserError: the URL does not parse, or its database driver is not installed
            (the message names the package to install and the other URL forms).
    """
    sqlalchemy_url = _parse_url(url)
    if sqlalchemy_url.get_backend_name() == "sqlite" and sqlalchemy_url.database:
        Path(sqlalchemy_url.database).parent.mkdir(parents=True, exist_ok=True)
    _check_driver(sqlalchemy_url)
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
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            if attempt == 5:
                first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
                raise UserError(
                    f"storage {short_repr(_shown(url))}: cannot open the database: {first}"
                ) from exc
            logger.debug("storage %s not ready (%s); retrying", _shown(url), exc)
            time.sleep(0.2 * attempt)


def _parse_url(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        raise UserError(
            f"storage {short_repr(_shown(url))} is not a database URL; write e.g. "
            "sqlite:///study.db, postgresql://USER:PASSWORD@HOST/DB or "
            "mysql+pymysql://USER:PASSWORD@HOST/DB"
        ) from None


def _shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: nothing to hide that we could find
        return url


def _check_driver(url: Any) -> None:
    """Import the URL's database driver, or say which package and URL form it needs."""
    from sqlalchemy.exc import NoSuchModuleError

    shown = url.render_as_string(hide_password=True)
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise UserError(
            f"storage {short_repr(shown)}: SQLAlchemy has no database "
            f"{short_repr(url.drivername)}; use sqlite:///, postgresql://, mysql+pymysql:// ..."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = dialect.driver
        package = DRIVER_PACKAGES.get(driver, driver)
        hint = ""
        backend = url.get_backend_name()
        others = [d for d in _DRIVERS_OF.get(backend, ()) if d != driver]
        if others:
            hint = "; or name another driver: " + ", ".join(
                f"{backend}+{d}://... (pip install '{DRIVER_PACKAGES[d]}')" for d in others
            )
        raise UserError(
            f"storage {short_repr(shown)} needs the database driver {driver!r} "
            f"({type(exc).__name__}: {exc}): pip install '{package}'{hint}"
        ) from None


_DRIVERS_OF = {  # the usual drivers of each database, the default first
    "postgresql": ("psycopg", "psycopg2"),
    "mysql": ("pymysql", "mysqldb"),
}


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


def _trial_folder(study: Any, number: int, study_dir: Path) -> Path:
    """The run folder trial ``number`` trained in: its recorded ``run_dir`` (a resume
    trains in the folder of the trial it resumes, so a chain of interruptions stays in the
    first trial's folder), else ``trial-NNNN`` by its number."""
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    recorded = None if frozen is None else frozen.user_attrs.get("run_dir")
    if isinstance(recorded, str) and recorded:
        return study_dir / Path(recorded).name  # by name: never a folder outside the study
    return study_dir / f"trial-{number:04d}"


def _pruner(optuna: Any, kind: str, startup: int, warmup: int, cfg: RunConfig) -> Any:
    """The pruner; none prunes a trial at its first ``warmup`` validations."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UserError(f"prune_warmup={warmup!r} must be a whole number of validations >= 0")
    t = cfg.train
    if kind == "median":  # Optuna's median pruner skips steps below n_warmup_steps
        return optuna.pruners.MedianPruner(
            n_startup_trials=startup, n_warmup_steps=warmup * t.eval_every + 1
        )
    if kind == "hyperband":  # its first rung is at min_resource steps
        first = min((warmup + 1) * t.eval_every, t.max_steps)
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=t.max_steps)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"pruner={kind!r} is not one of: {', '.join(PRUNERS)}")


def parse_duration(text: str | float | None) -> float | None:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"1.5d"`` -> seconds (``None`` stays): the
    durations ``train.max_time`` takes (:func:`moglstm.lm.stopping.parse_duration`)."""
    if text is None:
        return None
    try:
        return stopping.parse_duration(text)
    except UserError as exc:
        raise UserError(f"time budget {short_repr(text)}: {exc}") from None


def _budget(trials: int | None, timeout: float | str | None) -> float | None:
    """Check the budgets; return the time budget in seconds."""
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int)):
        raise TypeError(f"trials: expected an int, got {trials!r}")
    if trials is not None and trials < 1:
        raise UserError(f"trials={trials} must be >= 1")
    if trials is None and timeout is None:
        raise UserError("give a trial budget (--trials N), a time budget (--timeout 2h) or both")
    return parse_duration(timeout)


def _finished(study: Any, optuna: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=_counted(optuna)))


class StudyInterrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped the study; the trial it ended was saved.

    Attributes:
        signal: ``"SIGINT"`` or ``"SIGTERM"``.
        trial: the number of the trial it ended (marked failed), or ``None`` when it
            came between two trials.
        step: the training step that trial's ``last.pt`` holds, or ``None``.
    """

    def __init__(self, signal: str, trial: int | None = None, step: int | None = None):
        self.signal, self.trial, self.step = signal, trial, step
        where = "between trials" if trial is None else f"during trial {trial}"
        super().__init__(f"{signal} {where}")


class _OverBudget(Exception):
    """Other workers' trials already fill the study's trial budget."""


class _Session:
    """What one worker's :func:`_run_study` shares with its objective: the budget,
    the study-wide stop request, and the trials whose failure is ours to report."""

    def __init__(self, optuna: Any, study: Any, trials: int | None) -> None:
        self.optuna, self.study, self.trials = optuna, study, trials
        self.stop = stopping.GracefulStop("stopping the study after this trial's checkpoint")
        self.quiet: set[int] = set()  # trial numbers whose FAIL Optuna need not log

    def start_trial(self, trial: Any) -> None:
        """Before a trial draws its values: stop on a pending signal or a full budget.

        Trial numbers are handed out by the storage one at a time, so a trial is within
        the budget when fewer than ``trials`` trials numbered before it are finished,
        running or waiting: two workers cannot both take the last place.
        """
        if self.stop.requested is not None:
            self.quiet.add(trial.number)
            trial.set_user_attr("interrupted", self.stop.requested)
            self._queue_again(trial)  # a resume taken now must still be there next time
            raise StudyInterrupted(self.stop.requested)
        if self.trials is None:
            return
        states = self.optuna.trial.TrialState
        taken = (states.COMPLETE, states.PRUNED, states.RUNNING, states.WAITING)
        before = self.study.get_trials(deepcopy=False, states=taken)
        if sum(t.number < trial.number for t in before) >= self.trials:
            self.quiet.add(trial.number)
            trial.set_user_attr("skipped", f"the study's budget of {self.trials} trials is used")
            raise _OverBudget(trial.number)

    def _queue_again(self, trial: Any) -> None:
        """Queue a queued resume again, with its values, when it is stopped before it ran."""
        if "resumes" not in trial.user_attrs:
            return
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        params = frozen.system_attrs.get("fixed_params", {})
        self.study.enqueue_trial(params, user_attrs={"resumes": trial.user_attrs["resumes"]})

    def interrupted(self, trial: Any, signal: str, step: int) -> StudyInterrupted:
        """The exception that ends the study after ``signal`` stopped ``trial`` at ``step``:
        the trial is marked failed and queued again, to go on from its ``last.pt``."""
        self.stop.requested = signal  # a second signal from now on quits at once
        self.quiet.add(trial.number)
        trial.set_user_attr("interrupted", signal)
        trial.set_user_attr("step", step)
        self.study.enqueue_trial(trial.params, user_attrs={"resumes": trial.number})
        return StudyInterrupted(signal, trial.number, step)

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop Optuna's warnings about the failures this module reports itself."""
        match = re.match(r"Trial (\d+) failed", record.getMessage())
        return not (match and int(match.group(1)) in self.quiet)


def _run_study(
    optuna: Any,
    study: Any,
    objective: Callable[[Any, _Session], float],
    trials: int | None,
    timeout: float | None,
    catch: tuple[type[Exception], ...],
    heartbeat: int,
) -> str | None:
    """Optimize until the study has ``trials`` finished ones (all workers) or time is up.

    The first SIGINT/SIGTERM ends the study after the running trial has saved its
    checkpoint (that trial is marked failed and queued again); a second one raises
    :class:`KeyboardInterrupt` at once. Returns the signal's name if one stopped the
    study, else ``None``.
    """
    fail_stale = optuna.storages.fail_stale_trials
    fail_stale(study)  # trials of killed workers, before counting
    session = _Session(optuna, study, trials)
    remaining = None
    logger.info(
        "study %r: %d finished trials so far; budget: %s trials, %s",
        study.study_name,
        _finished(study, optuna),
        "no limit on" if trials is None else trials,
        "no time limit" if timeout is None else f"{timeout:.0f} s",
    )
    callbacks = [_log_trial, _stop_on_signal(session)]
    if trials is not None:
        remaining = trials - _finished(study, optuna)
        if remaining <= 0:
            logger.info("the study already has %d finished trials", _finished(study, optuna))
            return None
        callbacks.append(optuna.study.MaxTrialsCallback(trials, states=_counted(optuna)))
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(session.filter)
    try:
        with session.stop:
            study.optimize(
                lambda trial: objective(trial, session),
                n_trials=remaining,
                timeout=timeout,
                catch=(*catch, _OverBudget),
                callbacks=callbacks,
            )
    except StudyInterrupted as exc:
        what = "between two trials" if exc.trial is None else f"in trial {exc.trial}"
        saved = "" if exc.step is None else f" (saved at step {exc.step}; it goes on from there)"
        logger.warning("study %r stopped by %s %s%s", study.study_name, exc.signal, what, saved)
        return exc.signal
    finally:
        optuna_log.removeFilter(session.filter)
        fail_stale(study)  # a worker killed while the others used up the budget
        _log_running(study, optuna, heartbeat)
    return session.stop.requested


def _log_running(study: Any, optuna: Any, heartbeat: int) -> None:
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if running:
        numbers = ", ".join(str(t.number) for t in running)
        stale = 2 * heartbeat  # the grace period _storage sets
        logger.info(
            "trial %s still running: another worker's, or a killed worker's that the next "
            "`moglstm tune` of this study marks failed (and retries) once its heartbeat is "
            "%d s old",
            numbers,
            stale,
        )


def _stop_on_signal(session: _Session) -> Callable[[Any, Any], None]:
    def callback(study: Any, trial: Any) -> None:
        if trial.user_attrs.get("skipped") or session.stop.requested is not None:
            study.stop()

    return callback


def _counted(optuna: Any) -> tuple[Any, ...]:
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _log_trial(study: Any, trial: Any) -> None:
    attrs = trial.user_attrs
    if attrs.get("skipped"):
        logger.info("trial %d not run: %s", trial.number, attrs["skipped"])
        return
    shown = [k for k in attrs if k.startswith("best_")]
    scores = [f"{k.removeprefix('best_')} {attrs[k]:.4g}" for k in shown]
    value = "" if trial.value is None else f": loss {trial.value:.4f}"
    value += f" ({', '.join(scores)})" if scores and value else ""
    reason = f" ({attrs['pruned']})" if "pruned" in attrs else ""
    logger.info(
        "trial %d %s%s%s %s", trial.number, trial.state.name.lower(), value, reason, trial.params
    )


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
    """Counts per state, the best trial, and every trial as a row (see :func:`trial_rows`)."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    skipped = [t for t in trials if t.user_attrs.get("skipped")]
    out: dict[str, Any] = {
        "study": study.study_name,
        **extra,
        **{s.name.lower(): sum(t.state == s for t in trials) for s in states},
    }
    out["fail"] -= len(skipped)
    out["skipped"] = len(skipped)  # started past the budget by a racing worker: never ran
    rows = trial_rows(study, optuna)
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return {**out, "best_trial": None, "trials": rows}
    return {
        **out,
        "best_trial": best.number,
        "best_value": best.value,
        **{k: v for k, v in best.user_attrs.items() if k == "run_dir" or k.startswith("best_")},
        "best_params": best.params,
        "trials": rows,
    }


_STATE_ORDER = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")


def trial_rows(study: Any, optuna: Any) -> list[dict[str, Any]]:
    """The study's trials, best first: complete ones by objective, then pruned ones by
    their best reported loss, then running, waiting and failed ones.

    Each row: ``number``, ``state`` (Optuna's, lower case), ``value`` (the objective:
    best validation loss; for a pruned trial its best reported one), ``params``,
    ``run_dir`` and ``note`` (the pruner's reason, the signal that interrupted it).
    """
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if attrs.get("skipped"):
            continue
        value = t.value
        if value is None and t.intermediate_values:
            value = min(t.intermediate_values.values())
        note = attrs.get("pruned") or (
            f"interrupted by {attrs['interrupted']}" if "interrupted" in attrs else ""
        )
        if "resumes" in attrs:
            note = f"{note}; " if note else ""
            note += f"continues trial {attrs['resumes']}"
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": value,
                # a waiting trial's values are fixed when it is queued (a retry, a resume)
                "params": dict(t.params or t.system_attrs.get("fixed_params") or {}),
                "run_dir": attrs.get("run_dir"),
                "note": note,
            }
        )
    order = {name.lower(): i for i, name in enumerate(_STATE_ORDER)}
    rows.sort(key=lambda r: (order.get(r["state"], 9), _or_inf(r["value"]), r["number"]))
    return rows


def _or_inf(value: float | None) -> float:
    return math.inf if value is None or math.isnan(value) else value


def format_trials(rows: list[dict[str, Any]], limit: int | None = 30) -> str:
    """A plain-text table of :func:`trial_rows` (the first ``limit`` rows)."""
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", "state", "loss", *keys, "run", "note"]
    body = []
    for r in rows[:limit] if limit else rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        cells = [_cell(r["params"].get(k, "")) for k in keys]
        run = Path(r["run_dir"]).name if r["run_dir"] else ""
        body.append([str(r["number"]), r["state"], value, *cells, run, r["note"]])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (head, *body)
    ]
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more (--json lists every trial)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- training trials


class _ValidationReporter:
    """``train``'s ``on_step``: after each validation, report it and maybe prune; at any
    step, stop for a signal that came while the run was starting (before its own handler)."""

    def __init__(self, trial: Any, run_dir: Path, eval_every: int, session: _Session):
        self.trial, self.metrics, self.eval_every = trial, run_dir, eval_every
        self.session, self.pruned = session, session.optuna.TrialPruned

    def __call__(self, step: int, _: dict[str, float]) -> None:
        stop = self.session.stop
        if stop.requested is not None and not stop.handled_inside:  # came before train's own
            raise self.session.interrupted(self.trial, stop.requested, None)
        if step % self.eval_every:
            return
        record = _last_validation(self.metrics / "metrics.jsonl", step)
        if record is None or not math.isfinite(record["loss"]):
            return
        self.trial.report(record["loss"], step)
        if self.trial.should_prune():
            reason = _prune_reason(self.trial, step, record["loss"])
            self.trial.set_user_attr("pruned", reason)
            raise self.pruned(reason)


def _prune_reason(trial: Any, step: int, loss: float) -> str:
    """Why the pruner stopped ``trial`` at ``step``, as the trial's line shows it."""
    from optuna.trial import TrialState  # optional dependency: imported by now

    study = trial.study
    name = type(study.pruner).__name__.removesuffix("Pruner").lower()
    why = f"{name} pruner at step {step}: validation loss {loss:.4f}"
    if name == "median":  # as MedianPruner decides: best so far vs complete trials' median
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        others = [t.intermediate_values[step] for t in complete if step in t.intermediate_values]
        mine = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        best = min(mine.intermediate_values.values(), default=loss)
        if others:
            why = (
                f"{name} pruner at step {step}: best validation loss {best:.4f} > median "
                f"{statistics.median(others):.4f} of {len(others)} complete trials"
            )
    return why


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
    prune_warmup: int = PRUNE_WARMUP,
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
        prune_warmup: validations of each trial that are never pruned (the pruners
            compare trials from the next one on).
        seed: the sampler's seed (give each worker its own, or none).
        heartbeat: seconds between a worker's heartbeats; a trial whose worker is
            silent for twice that is failed and retried.

    Returns:
        ``{"study", "study_dir", "storage", "complete", "pruned", "fail", "running",
        "waiting", "skipped", "best_trial", "best_value" (validation loss),
        "best_<ppl|bpc>", "run_dir", "best_params", "trials" (see :func:`trial_rows`),
        "command" (the ``moglstm train`` command of the best values), "interrupted"}``,
        where ``interrupted`` is ``"SIGINT"``/``"SIGTERM"`` when a signal stopped the
        study (the trial it ended is marked failed and goes on from its ``last.pt``
        when the study is run again), else ``None``. A second signal raises
        ``KeyboardInterrupt`` at once.
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
        pruner=_pruner(optuna, pruner, prune_startup, prune_warmup, validate(base)),
        direction="minimize",
        load_if_exists=True,
    )

    def objective(trial: Any, session: _Session) -> float:
        session.start_trial(trial)
        retried = trial.user_attrs.get("resumes")  # after a signal, else a stale heartbeat
        retried = _retried_number(optuna, study_obj, trial) if retried is None else retried
        if retried is None:
            run_dir = study_dir / f"trial-{trial.number:04d}"
        else:  # the folder the retried trial trained in (itself a resume, maybe)
            run_dir = _trial_folder(study_obj, retried, study_dir)
        values = {p.key: p.suggest(trial) for p in space.params}
        resume = retried is not None and (run_dir / "last.pt").is_file()
        if resume:
            from moglstm.lm.runs.folder import resume_config

            cfg = resume_config(run_dir)
            logger.info("trial %d: resuming %s (retry of trial %d)", trial.number, run_dir, retried)
        else:
            cfg = _apply(base, values)
            cfg.name, cfg.out_dir = run_dir.name, str(study_dir)
            if retried is not None and run_dir.exists():  # failed before its first checkpoint
                run_dir = study_dir / f"trial-{trial.number:04d}"
                cfg.name = run_dir.name
        trial.set_user_attr("run_dir", str(run_dir))
        reporter = _ValidationReporter(trial, run_dir, cfg.train.eval_every, session)
        from moglstm.lm.train import train

        with _quiet_training():
            results = train(cfg, resume=resume, quiet=True, on_step=reporter)
        if results["stopped"] in ("SIGINT", "SIGTERM"):  # saved in last.pt: not a result
            raise session.interrupted(trial, results["stopped"], results["step"])
        metric = "bpc" if "best_valid_bpc" in results else "ppl"
        trial.set_user_attr(f"best_{metric}", results[f"best_valid_{metric}"])
        return results["best_valid_loss"]

    interrupted = _run_study(
        optuna,
        study_obj,
        objective,
        trials,
        seconds,
        (NonFiniteLossError, RunLockedError, ValueError),
        heartbeat,
    )
    out = _summary(study_obj, optuna, {"study_dir": str(study_dir), "storage": storage})
    if out["best_trial"] is not None:
        out["command"] = train_command(space, overrides, out["best_params"], base, study_dir)
    return {**out, "interrupted": interrupted}


def train_command(
    space: SearchSpace,
    overrides: list[str],
    params: dict[str, Any],
    base: RunConfig,
    study_dir: Path,
) -> str:
    """The ``moglstm train`` command line that trains ``params`` as the study's trials were
    trained: the space's preset and overrides, the study's overrides, then the values."""
    import shlex

    items = [*space.overrides, *overrides]
    drawn = {p.key: p for p in space.params}
    for key, value in params.items():
        param = drawn.get(key)
        if param is not None and param.kind == "choice":  # JSON text back to its value
            options = [v if _is_scalar(v) else json.dumps(v) for v in param.values]
            value = param.values[options.index(value)] if value in options else value
        items.append(f"{key}={json.dumps(value)}")
    keys = {item.partition("=")[0].strip() for item in items}
    if space.preset is None and not keys & {"data", "data.corpus"}:
        # `train` without a preset or a corpus override trains the quick start, not the
        # built-in defaults the trials started from
        items.insert(0, f"data.corpus={json.dumps(base.data.corpus)}")
    words = ["moglstm", "train"]
    if space.preset is not None:
        words += ["--preset", space.preset]
    # beside the study's folder, not in it: `moglstm report STUDY` shows the trials only
    words += ["--out-dir", str(study_dir.parent), "--name", f"{study_dir.name}-best", *items]
    return shlex.join(words)


# --------------------------------------------------------------------------- dynamic evaluation


class _Stoppable:
    """A progress bar's ``update`` that ends a dynamic trial at once on a signal: it has
    nothing to save, and the weights are restored on the way out."""

    def __init__(self, bar: Any, session: _Session, trial: Any) -> None:
        self.bar, self.session, self.trial = bar, session, trial

    def update(self, tokens: int, loss_sum: Any) -> None:
        signal = self.session.stop.requested
        if signal is not None:
            self.session.quiet.add(self.trial.number)
            self.trial.set_user_attr("interrupted", signal)
            raise StudyInterrupted(signal, self.trial.number)
        self.bar.update(tokens, loss_sum)


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
    grad_batches: int = DYNAMIC_GRAD_BATCHES,
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
    ``data.eval_batch_size``; 1 is the paper's protocol, and slowest). Unless the space
    tunes ``dynamic.grad_batches``, the gradients are taken over the first
    ``grad_batches`` training windows (the whole split of a large corpus would take
    longer than the study). Each trial logs a line as it starts and as it ends; on a
    terminal, progress bars show the gradients and the scoring.

    Returns:
        The study's summary (see :func:`tune`), with ``best_<ppl|bpc>`` and the
        ``evaluate`` command line of the best settings.
    """
    seconds = _budget(trials, timeout)
    optuna = _optuna()
    from moglstm.lm.data import batchify, load_corpus
    from moglstm.lm.dynamic_eval import DynamicEvalSettings, dynamic_evaluate, gradient_statistics
    from moglstm.lm.metrics import metrics_for
    from moglstm.lm.progress import ScoreProgress
    from moglstm.lm.runs.folder import load_run

    space = space if isinstance(space, SearchSpace) else load_space(space)
    for p in space.params:
        if p.key.partition(".")[0] != "dynamic" or p.key.partition(".")[2] not in DYNAMIC_KEYS:
            raise UserError(
                f"search space key {p.key!r}: dynamic evaluation tunes "
                f"{', '.join('dynamic.' + k for k in DYNAMIC_KEYS)}"
            )
        for value in p.extremes():  # DynamicEvalSettings checks each value
            DynamicEvalSettings(**{p.key.partition(".")[2]: value})
    DynamicEvalSettings(grad_batches=grad_batches)  # checks it
    loaded = load_run(run, checkpoint, device)
    run_dir = loaded.checkpoint.parent
    cfg = loaded.config
    corpus = load_corpus(cfg.data, vocab=loaded.vocab)
    target = next(loaded.model.parameters()).device
    valid = batchify(corpus.valid, batch_size or cfg.data.eval_batch_size).to(target)
    train_data = batchify(corpus.train, cfg.data.batch_size).to(target)
    stats: dict[int | None, Any] = {}
    tokens = valid.numel() if max_tokens is None else min(max_tokens, valid.numel())
    windows = max(1, (train_data.size(0) - 1) // cfg.data.bptt)

    def objective(trial: Any, session: _Session) -> float:
        session.start_trial(trial)
        values = {p.key.partition(".")[2]: p.suggest(trial) for p in space.params}
        values.setdefault("grad_batches", grad_batches)
        settings = DynamicEvalSettings(**values)
        if settings.grad_batches not in stats:
            started = time.perf_counter()
            logger.info(
                "mean squared gradients over %d of %d training windows...",
                min(settings.grad_batches or windows, windows),
                windows,
            )
            with ScoreProgress(train_data, corpus.level, "gradients", max_tokens=None) as bar:
                stats[settings.grad_batches] = gradient_statistics(
                    loaded.model,
                    train_data,
                    cfg.data.bptt,
                    max_batches=settings.grad_batches,
                    progress=_Stoppable(bar, session, trial),
                )
            logger.info("gradients done in %.0f s", time.perf_counter() - started)
        logger.info("trial %d: scoring %d validation tokens %s", trial.number, tokens, values)
        label = f"trial {trial.number}"
        with ScoreProgress(valid, corpus.level, label, max_tokens=max_tokens) as bar:
            loss, _ = dynamic_evaluate(
                loaded.model,
                valid,
                stats[settings.grad_batches],
                settings,
                max_tokens=max_tokens,
                progress=_Stoppable(bar, session, trial),
            )
        if not math.isfinite(loss):
            raise optuna.TrialPruned(f"diverged (loss {loss})")
        name, value = next(iter(metrics_for(loss, corpus.level).items() - {("loss", loss)}))
        trial.set_user_attr(f"best_{name}", value)
        return loss

    study_name = study or "dynamic"
    if storage is None and (Path(study_name).name != study_name or study_name in (".", "..")):
        raise UserError(f"study={short_repr(study_name)}: give a name, not a path")
    if storage is None:  # in the run folder: SQLite would follow a planted link out of it
        storage = f"sqlite:///{check_regular_or_absent(run_dir / (study_name + '.db'))}"
    study_obj = optuna.create_study(
        study_name=study_name,
        storage=_storage(optuna, storage, heartbeat),
        sampler=optuna.samplers.TPESampler(seed=seed),
        direction="minimize",
        load_if_exists=True,
    )
    interrupted = _run_study(optuna, study_obj, objective, trials, seconds, (), heartbeat)
    out = _summary(study_obj, optuna, {"run_dir": str(run_dir), "storage": storage})
    out["interrupted"] = interrupted
    if out["best_trial"] is not None:
        flags = " ".join(
            f"--dynamic-{k.partition('.')[2].replace('_', '-')} {v}"
            for k, v in out["best_params"].items()
        )
        if "dynamic.grad_batches" not in out["best_params"]:
            flags += f" --dynamic-grad-batches {grad_batches}"
        out["command"] = f"moglstm evaluate {run_dir} --split test --batch-size 1 --dynamic {flags}"
    return out
