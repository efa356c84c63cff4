"""Training: one loop, read top to bottom, with exact resumption.

Why one module of about 900 lines: setting up a run, a step, validation, checkpoints,
non-finite losses and stopping all read and write the one ``_Run`` record of a session,
in the order the loop meets them; cut apart, each piece would take the whole record
and the reader would jump between files to follow one step. What does not touch the
record lives elsewhere: the schedule and optimiser (:mod:`moglstm.lm.policies`), the
metrics file (:mod:`moglstm.lm.metrics`), run folders and resume rules
(:mod:`moglstm.lm.runs`), devices and random state (:mod:`moglstm.lm.runtime`).

:func:`train` runs a :class:`~moglstm.lm.config.RunConfig` in its run folder
``<out_dir>/<name>/``, which ends up holding::

    config.yaml     the resolved config (with the hidden size a num_params budget solved)
    metrics.jsonl   one JSON object per log or validation event
    status.json     how the last session ended: {"step", "stopped"[, "error"]}
    last.pt         written every train.eval_every steps and at the end
    best.pt         written whenever the validation loss improves
    events.*        TensorBoard events, config and final metrics as HParams (only when
                    tensorboard is installed: the ``tensorboard`` extra)

Truncated backpropagation through time: the training split is cut into
``data.batch_size`` streams walked in windows of ``data.bptt`` steps; the model
state is carried from window to window (detached) and reset when the streams
wrap around. The loss is the mean token cross-entropy.

Resuming (``resume=True``) rebuilds everything from ``last.pt`` alone: model,
optimizer, learning-rate schedule, gradient scaler, counters, the stream's
position, the carried state and every random generator, so on CPU a resumed run
ends with bit-identical weights to one that never stopped. Only the settings in
:data:`~moglstm.lm.runs.folder.RESUMABLE_KEYS` may differ from the checkpoint's
config.

Surviving faults: checkpoints are written atomically and read back before they
replace anything; the previous ``last.pt`` is kept as ``last.prev.pt`` and
resuming falls back to it (with a warning naming the bad file) when ``last.pt`` is
missing, truncated, corrupt or inconsistent with its own config (checked before
the model is built: :func:`~moglstm.lm.runs.payload.check_training_checkpoint`);
``best.pt`` keeps ``best.prev.pt`` the same way. Nothing in the run folder is
followed out of it (see :mod:`moglstm.lm.safety`). Before the model is built its
training memory is estimated and a run that cannot fit is refused
(:mod:`moglstm.lm.budget`). A run holds an exclusive lock on its folder itself
(see :mod:`moglstm.lm.runlock`), so a second run on the same folder refuses to start.
A NaN or infinite training loss stops the run, skips the step or rolls back to
``last.pt`` with a lower learning rate (``train.nonfinite``).

Stopping early loses no work: the first SIGINT (Ctrl-C) or SIGTERM lets the current step
finish (a validation or its temperature search is abandoned at once), saves ``last.pt`` at
the step reached and returns (``stopped`` is the signal's name); a second one raises
``KeyboardInterrupt`` at once (:mod:`moglstm.lm.stopping`).
``train.max_time`` stops a session before the step that would overrun it, leaving time for
the final validation and checkpoint. A start that fails before writing anything removes
the run folder it created.

Under ``torchrun`` the loop trains data-parallel (see :mod:`moglstm.lm.distributed`):
each process takes its share of the batch streams, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moglstm.lm import distributed
from moglstm.lm.budget import check_training_fits
from moglstm.lm.config import (
    RunConfig,
    from_dict,
    save_config,
    to_dict,
    validate,
)
from moglstm.lm.data import BatchStream, Corpus, Vocab, batchify, load_corpus
from moglstm.lm.distributed import DistContext
from moglstm.lm.evaluate import (
    OFFICIAL_TEMPERATURES,
    evaluate_loss,
    score_split,
)
from moglstm.lm.metrics import MetricsLog, NullLog, metric_name, metrics_for
from moglstm.lm.models import build_model, count_parameters, with_resolved_sizes
from moglstm.lm.policies import (
    NonFiniteLossError,
    PlateauSchedule,
    make_optimizer,
    nonfinite_weights,
)
from moglstm.lm.regularize import WeightAverager, drop_state, l2_penalty
from moglstm.lm.runlock import LOCK_FILE, RunFolderChangedError, RunLock, check_writer
from moglstm.lm.runs.checkpoint import remove_stale_temp_files, save_checkpoint
from moglstm.lm.runs.folder import (
    STATUS_FILE,
    _check_resumable,
    _check_run_folder,
    _load_last,
    check_fresh,
)
from moglstm.lm.runs.payload import CheckpointPayload
from moglstm.lm.runtime import (
    autocast,
    autocast_dtype,
    capture_rng_state,
    fix_cpu_threads,
    resolve_device,
)
from moglstm.lm.safety import write_atomic
from moglstm.lm.state import cat_states, detach_state, map_state, split_state
from moglstm.lm.stopping import GracefulStop, StopRequested, format_duration, parse_duration

__all__ = ["train"]

logger = logging.getLogger(__name__)

OnStep = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------- run state


@dataclass
class _Counters:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # completed passes over the training split
    tokens: int = 0  # training tokens seen
    elapsed: float = 0.0  # wall seconds trained so far, summed over sessions
    # the training-loss average since the last log line: a resumed run's first line then
    # averages the same steps as an uninterrupted run's
    window_loss: float = 0.0  # sum of loss * tokens
    window_tokens: int = 0
    window_time: float = 0.0  # seconds of those steps (the logged speed)
    threads: int = 0  # CPU threads the run trains with (0: not recorded)
    best_saved_loss: float = math.inf  # validation loss of best.pt
    valid_loss: float | None = None  # the latest validation loss
    skipped_steps: int = 0  # steps without an update: non-finite loss, train.nonfinite=skip
    rollbacks: int = 0  # returns to last.pt after a non-finite loss (train.nonfinite=rollback)
    nonfinite_streak: int = 0  # non-finite losses since the last checkpoint
    # a scheduled validation a signal abandoned at this step (0: none): a resume does it first
    unvalidated_step: int = 0
    last_saved_step: int | None = None  # step of last.pt (not stored in it)


@dataclass
class _Run:
    """Everything the loop touches, built by :func:`_setup`."""

    cfg: RunConfig
    run_dir: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    corpus: Corpus
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: PlateauSchedule
    scaler: Any  # torch.amp.GradScaler for float16 autocast, else None
    stream: BatchStream
    valid_data: Tensor
    counters: _Counters
    state: Any = None  # the recurrent state carried between windows
    session_start: float = 0.0  # perf_counter() value at which `elapsed` was 0
    deadline: float = math.inf  # perf_counter() value by which train.max_time ends this session
    stop: GracefulStop | None = None  # SIGINT/SIGTERM turned into a stop after the step
    dist: DistContext = dataclasses.field(default_factory=DistContext)  # rank, world size
    net: nn.Module | None = None  # `model` wrapped for data-parallel training (or None)
    averager: WeightAverager | None = None  # running weight average (train.average_*)
    valid_temperature: float = 1.0  # the latest validation's (train.eval_temperature_tokens)
    bar_fields: dict[str, str] = dataclasses.field(default_factory=dict)  # the bar's postfix


def _setup(
    cfg: RunConfig, checkpoint: CheckpointPayload | None, ctx: DistContext | None = None
) -> _Run:
    """Build data, model and optimizer; restore them from ``checkpoint`` when resuming.

    ``ctx``: this process's place in a data-parallel job; ``None`` for a single process.
    """
    ctx = ctx or DistContext(device=resolve_device(cfg.train.device))
    device = ctx.device
    threads = fix_cpu_threads(cfg.train.threads)  # sums split over threads: a fixed split
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # also seeds every CUDA device
    vocab = Vocab.from_dict(checkpoint["vocab"]) if checkpoint else None
    # rank 0 first: it alone downloads a missing corpus into the cache
    corpus = distributed.main_first(lambda: load_corpus(cfg.data, vocab=vocab), ctx)
    # config.yaml and the checkpoints record the sizes a model.num_params budget gives
    cfg = dataclasses.replace(cfg, model=with_resolved_sizes(cfg.model, len(corpus.vocab)))
    # before anything is allocated: refuse a model whose training cannot fit
    estimate = distributed.run_on_main(
        lambda: check_training_fits(cfg, len(corpus.vocab), device, ctx.world_size), ctx
    )
    if estimate is not None:
        logger.info("training needs about %.2f GB (an estimate)", estimate.total / 1e9)
    model = build_model(cfg.model, len(corpus.vocab)).to(device)
    distributed.seed_rank_generators(cfg.train.seed, ctx)  # same weights, own dropout masks
    amp_dtype = autocast_dtype(device, cfg.train.amp)
    bptt = cfg.data.bptt
    max_len = getattr(model, "max_len", None)  # a Transformer cannot take longer windows
    stream = BatchStream(
        distributed.shard_streams(batchify(corpus.train, cfg.data.batch_size), ctx).to(device),
        bptt,
        variable_length=cfg.data.variable_length,
        seed=cfg.train.seed,
        max_length=None if max_len is None else max(bptt, min(bptt + 20, max_len)),
    )
    t = cfg.train
    run = _Run(
        cfg=cfg,
        run_dir=Path(cfg.out_dir) / cfg.name,
        device=device,
        amp_dtype=amp_dtype,
        corpus=corpus,
        model=model,
        optimizer=make_optimizer(model, t),
        schedule=PlateauSchedule(t.lr, kind=t.schedule, decay=t.lr_decay, patience=t.lr_patience),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        stream=stream,
        valid_data=distributed.shard_eval_streams(
            batchify(corpus.valid, cfg.data.eval_batch_size), ctx
        ).to(device),
        counters=_Counters(threads=threads),
        dist=ctx,
    )
    run.averager = WeightAverager(model)
    if checkpoint is not None:
        _restore(run, checkpoint)
        _check_threads(run, threads)
    run.net = distributed.wrap_model(model, ctx)  # after restoring: ranks start equal
    return run


def _check_threads(run: _Run, threads: int) -> None:
    """Resuming on another CPU thread count: say that the bits will differ."""
    trained_on, run.counters.threads = run.counters.threads, threads
    if trained_on and trained_on != threads and run.device.type == "cpu" and run.dist.is_main:
        logger.warning(
            "this run was trained on %d CPU threads and goes on with %d: the results will "
            "differ in the last bits from an uninterrupted run (train.threads=%d gives the same)",
            trained_on,
            threads,
            trained_on,
        )


def _restore(run: _Run, ckpt: CheckpointPayload) -> None:
    # "model" holds the averaged weights once averaging started; training goes on from
    # the raw ones, saved beside them (see _model_entries)
    run.model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    run.averager.restore(int(ckpt.get("averaging", {}).get("count", 0)), ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.stream.load_state_dict(ckpt["data"])
    saved = ckpt["counters"]
    fields = {f.name for f in dataclasses.fields(_Counters)}
    run.counters = _Counters(**{k: v for k, v in saved.items() if k in fields})
    run.counters.last_saved_step = run.counters.step
    # the checkpoint holds the global batch's state: take this rank's streams
    run.state = map_state(
        distributed.scatter_state(ckpt.get("train_state"), run.dist), lambda t: t.to(run.device)
    )
    # last: building the model above drew from the RNG
    distributed.restore_rng(ckpt, run.dist, run.cfg.train.seed)


def _payload(run: _Run) -> CheckpointPayload:
    """The checkpoint's content. Collective: every rank must call it (rank 0 saves it)."""
    counters = dataclasses.asdict(run.counters)
    del counters["last_saved_step"]
    counters.update(
        lr=run.schedule.lr,
        best_valid_loss=run.schedule.best,
        bad_validations=run.schedule.bad,
    )
    return {
        **_model_entries(run),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.schedule.state_dict(),
        "scaler": None if run.scaler is None else run.scaler.state_dict(),
        "config": to_dict(run.cfg),
        "counters": counters,
        "data": run.stream.state_dict(),
        "rng": capture_rng_state(),  # rank 0's; every rank's under rng_per_rank
        **distributed.gather_rng(run.dist),
        "vocab": run.corpus.vocab.to_dict(),
        # detached carried state of the global batch: resuming continues it exactly
        "train_state": distributed.gather_state(run.state, run.dist),
    }


# --------------------------------------------------------------------------- one step


def _train_step(run: _Run, inputs: Tensor, targets: Tensor) -> float:
    """Forward, backward, clip and update on one window; returns the loss."""
    t = run.cfg.train
    lr = run.schedule.lr
    if run.cfg.data.variable_length:  # AWD-LSTM: scale the rate with the window length
        lr *= inputs.size(0) / run.cfg.data.bptt
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.cfg.model.drop_state_probability > 0:  # some streams start from a zero state
        run.state = drop_state(run.state, run.cfg.model.drop_state_probability)
    run.optimizer.zero_grad(set_to_none=True)
    scaler = run.scaler
    value, state = _accumulate_gradients(run, inputs, targets)
    if not math.isfinite(value):
        return value  # the caller applies train.nonfinite; nothing is updated
    if t.l2 > 0:  # part of the loss (clipped, Adam-normalised); `value` stays the data loss
        penalty = l2_penalty(run.model, t.l2)
        (penalty if scaler is None else scaler.scale(penalty)).backward()
    if t.clip > 0:
        if scaler is not None:
            scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), t.clip)
    if scaler is None:
        run.optimizer.step()
    else:
        scaler.step(run.optimizer)
        scaler.update()
    _average_weights(run)
    run.state = detach_state(state)  # carry the state, cut its history
    return value


def _accumulate_gradients(run: _Run, inputs: Tensor, targets: Tensor) -> tuple[float, Any]:
    """Backward of the window's mean token loss, in sub-batches of ``train.accum_batch_size``
    streams (all at once when unset); returns the loss and the new (undetached) state.

    Each sub-batch's mean loss is weighted by its share of the tokens, so the summed
    gradients are those of the whole batch's mean loss: the update does not depend on
    the split (up to rounding), only the memory does.
    """
    batch = inputs.size(1)
    sizes = _sub_batches(batch, run.cfg.train.accum_batch_size)
    states = split_state(run.state, sizes)
    value, new_states = 0.0, []
    for x, y, state in zip(inputs.split(sizes, 1), targets.split(sizes, 1), states, strict=True):
        with autocast(run.device, run.amp_dtype):
            logits, state = (run.net or run.model)(x, state)  # (T, b, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss = loss * (x.size(1) / batch)
        # the global batch's loss; checked before any backward, so every rank skips alike
        value += distributed.mean_over_ranks(loss.item(), run.dist)
        if not math.isfinite(value):
            return value, None
        (loss if run.scaler is None else run.scaler.scale(loss)).backward()
        new_states.append(state)
    return value, cat_states(new_states)


def _sub_batches(batch: int, accum: int | None) -> list[int]:
    # this process's streams in pieces of at most `accum` (a rank may hold a share of the
    # global batch that `accum` does not divide: the last piece is smaller)
    if accum is None or accum >= batch:
        return [batch]
    return [accum] * (batch // accum) + ([batch % accum] if batch % accum else [])


def _average_weights(run: _Run) -> None:
    """After an update: fold the weights into the running average, or start it at
    ``train.average_from_step`` (validations start it too: see _evaluate_and_save)."""
    start = run.cfg.train.average_from_step
    if run.averager.active:
        run.averager.update()
    elif start and run.counters.step + 1 >= start:  # the step counter moves on after this
        _start_averaging(run, f"step {run.counters.step + 1} reached train.average_from_step")


def _start_averaging(run: _Run, why: str) -> None:
    run.averager.start()
    if run.dist.is_main:
        logger.info("%s: averaging the weights from now on", why)


def _model_entries(run: _Run) -> dict[str, Any]:
    """Checkpoint entries for the weights: ``model`` is what validation scored (the
    average, once started); ``train_model`` and ``averaging`` let a resume go on exactly."""
    if not run.averager.active:
        return {"model": run.model.state_dict()}
    return {
        "model": run.averager.averaged_state_dict(),
        "train_model": run.model.state_dict(),
        "averaging": {"count": run.averager.count},
    }


def _validate(run: _Run) -> tuple[float, int]:
    """Validation loss and the number of tokens scored; the model goes back to training.

    With several ranks, each scores its share of the streams and the results are
    combined (the same on every rank).
    """
    data = run.valid_data  # this rank's streams (all of them for one process)
    cap = distributed.local_token_cap(
        run.cfg.train.eval_max_tokens, run.cfg.data.eval_batch_size, data.size(1)
    )
    loss, count = 0.0, 0
    with run.averager.swapped_in():  # the averaged weights, once averaging started
        run.valid_temperature = t = _search_temperature(run, data)
        if data.size(1) and cap != 0:  # more ranks than streams leaves some with nothing
            bptt, amp = run.cfg.data.bptt, run.amp_dtype
            poll = _StopPoll(run.stop)  # a signal ends the validation between two windows
            if t == 1.0:
                loss, count = evaluate_loss(
                    run.model, data, bptt, max_tokens=cap, amp_dtype=amp, progress=poll
                )
            else:
                (loss,), count = score_split(
                    run.model, data, bptt, temperatures=[t], max_tokens=cap, amp_dtype=amp,
                    progress=poll,
                )
    loss, count = distributed.average_loss(loss, count, run.dist)
    run.model.train()
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite validation loss ({loss}) at step {run.counters.step}; stopping. "
            + _checkpoint_note(run)
        )
    return loss, count


class _StopPoll:
    """Passed as an evaluation's ``progress``: between two windows it raises
    :class:`StopRequested` once SIGINT/SIGTERM asked the run to stop. Only there: a
    validation is never cut inside a window or while the averaged weights are swapped
    back, so what the run saves next is whole."""

    def __init__(self, stop: GracefulStop | None) -> None:
        self.stop = stop

    def update(self, tokens: int, loss: Any) -> None:
        if self.stop is not None and self.stop.requested is not None:
            raise StopRequested(self.stop.requested)


def _search_temperature(run: _Run, data: Tensor) -> float:
    """The softmax temperature validation scores with: 1, or with
    ``train.eval_temperature_tokens`` the best of the official code's candidates on that
    many validation tokens (the official code searches before every validation)."""
    tokens = run.cfg.train.eval_temperature_tokens
    if not tokens:
        return 1.0
    cap = distributed.local_token_cap(tokens, run.cfg.data.eval_batch_size, data.size(1))
    losses, count = [0.0] * len(OFFICIAL_TEMPERATURES), 0
    if data.size(1) and cap != 0:
        losses, count = score_split(
            run.model,
            data,
            run.cfg.data.bptt,
            temperatures=OFFICIAL_TEMPERATURES,
            max_tokens=cap,
            amp_dtype=run.amp_dtype,
            progress=_StopPoll(run.stop),
        )
    losses = [distributed.average_loss(loss, count, run.dist)[0] for loss in losses]
    return OFFICIAL_TEMPERATURES[losses.index(min(losses))]  # ties: the first, as official


def _checkpoint_note(run: _Run) -> str:
    saved = run.counters.last_saved_step
    if saved is None:
        where = "No checkpoint had been saved yet"
    else:
        where = f"The checkpoints in {run.run_dir} (last.pt from step {saved}) are kept"
    return f"{where}. Try a lower train.lr or gradient clipping (train.clip)."


# --------------------------------------------------------------------------- the loop


def train(
    cfg: RunConfig,
    resume: bool = False,
    *,
    quiet: bool = False,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Train a language model as ``cfg`` describes; return the final metrics.

    Args:
        cfg: the run's config (validated here). The run folder is
            ``<cfg.out_dir>/<cfg.name>``; a new run refuses a folder that already
            holds one.
        resume: continue the run in the folder from its ``last.pt``. The config is
            the checkpoint's; ``cfg`` may differ from it only in
            :data:`RESUMABLE_KEYS` (e.g. a larger ``train.max_steps``). See
            :func:`resume_config` to build such a ``cfg`` from the folder alone.
        quiet: no progress bar (it is also off when stderr is not a terminal).
        on_step: called as ``on_step(step, {"loss": ..., "lr": ...})`` after every
            optimizer step (after that step's checkpoint, if any). An exception it
            raises stops the run like a crash would.

    Returns:
        ``{"run_dir", "step", "epoch", "train_loss", "valid_loss", "valid_<ppl|bpc>",
        "best_valid_loss", "best_valid_<ppl|bpc>", "tokens_per_s", "elapsed",
        "stopped", "skipped_steps", "rollbacks"}``, where ``stopped`` is
        ``"max_steps"``, ``"early_stop"``, ``"max_time"`` (``train.max_time`` ran out),
        or ``"SIGINT"``/``"SIGTERM"`` (a signal asked to stop: ``last.pt`` holds the step
        reached, see :class:`~moglstm.lm.stopping.GracefulStop`; a second signal raises
        ``KeyboardInterrupt`` at once). Under torchrun every rank returns the same losses
        (and signals are not caught).

    Raises:
        FileExistsError: a new run would overwrite an existing run folder.
        FileNotFoundError: ``resume`` but there is no ``last.pt``.
        RunLockedError: another process is training in the run folder.
        CheckpointError: ``resume`` but neither ``last.pt`` nor ``last.prev.pt`` reads.
        ValueError: an invalid config, or a resume that changes a fixed setting.
        NonFiniteLossError: the loss became NaN or infinite and ``train.nonfinite`` is
            ``stop`` (or ``train.max_nonfinite`` ran out); checkpoints are kept.
        OSError: a checkpoint could not be written (e.g. a full disk); the previous
            one is intact.
    """
    started = time.perf_counter()  # train.max_time counts from here, setup included
    cfg = validate(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    new_folder = not run_dir.exists()
    session = distributed.session(cfg.train.device, cfg.train.dist_timeout)
    with session as ctx, distributed.peer_failures(ctx):
        distributed.check_batch_size(cfg.data.batch_size, ctx)
        lock = RunLock(run_dir)
        try:
            # rank 0 locks the folder and reads the checkpoint; the others get a copy
            checkpoint = distributed.run_on_main(lambda: _claim(run_dir, resume, lock), ctx)
            checkpoint = distributed.broadcast_object(checkpoint, ctx)
            if checkpoint is not None:
                _check_resumable(from_dict(checkpoint["config"]), cfg)
            run = _setup(cfg, checkpoint, ctx)
            del checkpoint  # free the host copy of the weights
            if cfg.train.max_time is not None:
                run.deadline = started + parse_duration(cfg.train.max_time)
            return _train_run(run, resume, quiet, on_step)
        finally:
            failed_start = (
                new_folder and ctx.is_main and lock.owns_folder() and _holds_only_the_lock(run_dir)
            )
            if failed_start:  # unlinked while still locked: no other run can be using it
                (run_dir / LOCK_FILE).unlink(missing_ok=True)
            lock.release()
            if failed_start:
                with contextlib.suppress(OSError):  # another run just claimed it: keep it
                    run_dir.rmdir()


def _holds_only_the_lock(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but its lock file: a start that failed before
    writing anything, which leaves no run folder behind."""
    try:
        return [p.name for p in run_dir.iterdir()] in ([LOCK_FILE], [])
    except OSError:
        return False


def _claim(run_dir: Path, resume: bool, lock: RunLock) -> dict[str, Any] | None:
    """Rank 0: lock the run folder; check it holds no run (new) or read its last.pt."""
    if resume:
        _check_run_folder(run_dir)  # before the lock creates it
    lock.acquire()
    remove_stale_temp_files(run_dir)  # left by a killed run; ours alone now
    if not resume:
        check_fresh(run_dir)
        return None
    return _load_last(run_dir)


def _train_run(run: _Run, resume: bool, quiet: bool, on_step: OnStep | None) -> dict[str, Any]:
    """Everything after setup: run files (rank 0), the loop, the results."""
    cfg, ctx = run.cfg, run.dist
    distributed.run_on_main(lambda: save_config(cfg, run.run_dir / "config.yaml"), ctx)
    if ctx.is_main:
        _log_start(run, resume)
    if not resume and cfg.train.nonfinite == "rollback":
        _save_checkpoints(run, best=False)  # somewhere to go back to before the first validation
    resume_step = run.counters.step if resume else None
    guard = functools.partial(check_writer, run.run_dir)  # still the folder this run locked
    log = (
        distributed.run_on_main(
            lambda: MetricsLog(run.run_dir, resume_step, before_write=guard), ctx
        )
        or NullLog()
    )
    bar = tqdm(
        total=cfg.train.max_steps,
        initial=run.counters.step,
        disable=True if quiet or not ctx.is_main else None,  # None: off when not a terminal
        unit="step",
        dynamic_ncols=True,
        # tqdm's own estimate of the time left knows neither validations nor train.max_time:
        # the postfix shows ours (left=...)
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]",
    )
    # data-parallel ranks would stop at different steps: there a signal ends the job
    stop = GracefulStop("saving a checkpoint after this step") if ctx.world_size == 1 else None
    try:
        with _messages_above_the_bar(bar), stop or contextlib.nullcontext():
            run.stop = stop
            stopped, train_loss, speed = _loop(run, log, bar, on_step)
        results = _results(run, stopped, train_loss, speed)
        log.hparams(to_dict(cfg), results)  # TensorBoard's HParams view: config -> outcome
    except BaseException as exc:
        if ctx.is_main:
            ended = "interrupted" if isinstance(exc, KeyboardInterrupt) else "error"
            _write_status(run, ended, exc)
        raise
    finally:
        run.stop = None
        bar.close()
        log.close()
    if ctx.is_main:
        _write_status(run, stopped)
    return results


def _write_status(run: _Run, stopped: str, error: BaseException | None = None) -> None:
    """Record how this session ended, for ``moglstm report``: ``{"step", "stopped"}`` with
    ``stopped`` as in the results, ``"interrupted"`` (a second signal) or ``"error"``
    (then ``"error"`` names the exception: ``TrialPruned`` is a study's pruning). A
    session killed outright leaves the previous session's file, whose step is behind."""
    record: dict[str, Any] = {"step": run.counters.step, "stopped": stopped}
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    try:
        check_writer(run.run_dir)  # never into a folder that replaced the one this run locked
        write_atomic(run.run_dir / STATUS_FILE, json.dumps(record).encode("utf-8"))
    except (OSError, RunFolderChangedError) as exc:  # the outcome matters more than its label
        logger.warning("could not record the run's status: %s", exc)


def _messages_above_the_bar(bar: Any) -> contextlib.AbstractContextManager:
    """Route console log handlers through ``tqdm.write`` while the bar is shown."""
    consoles = []
    current: logging.Logger | None = logger
    while current is not None:  # the loggers whose handlers our messages reach
        if any(_is_console(h) for h in current.handlers):
            consoles.append(current)
        current = current.parent if current.propagate else None
    if bar.disable or not consoles:
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=consoles)


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and stream in (sys.stdout, sys.stderr)


def _loop(
    run: _Run, log: MetricsLog, bar: Any, on_step: OnStep | None
) -> tuple[str, float | None, float]:
    """The training loop proper. Returns (why it stopped, last train loss, tokens/s)."""
    cfg, c = run.cfg, run.counters
    t = cfg.train
    run.model.train()
    run.session_start = time.perf_counter() - c.elapsed
    train_time = session_tokens = 0.0
    train_loss = None
    last_eval = c.step  # the checkpoint (if any) was taken right after a validation...
    eta = _Eta(run)
    stopped = None
    if c.unvalidated_step and c.unvalidated_step == c.step:  # ...or a signal abandoned it
        if not _validation_finished(run, log, on_schedule=c.step % t.eval_every == 0):
            return run.stop.requested, None, 0.0  # still owed; last.pt is as it was
        c.unvalidated_step = 0

    while c.step < t.max_steps and not _early_stopped(run):
        stopped = _stop_requested(run, eta)
        if stopped is not None:
            break
        step_start = time.perf_counter()
        inputs, targets, new_epoch = run.stream.next()  # (T, B) each
        if new_epoch:
            run.state = None  # the streams start over: zero state
        loss = _train_step(run, inputs, targets)
        c.step += 1
        if not math.isfinite(loss) and _on_nonfinite(run, log, loss) == "rollback":
            c = run.counters  # restored from last.pt, loss window included
            last_eval = bar.n = c.step
            continue
        tokens = targets.numel() * run.dist.world_size  # the global batch's
        c.epoch = run.stream.epoch
        c.tokens += tokens
        elapsed = time.perf_counter() - step_start
        if math.isfinite(loss):  # a skipped step (train.nonfinite=skip) adds nothing
            c.window_loss += loss * tokens
            c.window_tokens += tokens
        c.window_time += elapsed
        train_time += elapsed
        session_tokens += tokens
        eta.step_done(elapsed)
        _show_progress(run, bar, eta)
        bar.update(1)  # redraws with the fields

        if c.step % t.log_every == 0 and c.window_tokens:
            train_loss = c.window_loss / c.window_tokens
            c.elapsed = time.perf_counter() - run.session_start
            speed = c.window_tokens / c.window_time if c.window_time else 0.0
            _log_train(run, log, bar, train_loss, speed, eta)
            c.window_loss, c.window_tokens, c.window_time = 0.0, 0, 0.0

        if c.step % t.eval_every == 0:
            eval_start = time.perf_counter()
            if not _validation_finished(run, log, on_schedule=True):
                stopped = run.stop.requested  # a signal ended it: save the step reached
                c.unvalidated_step = c.step  # and the resume validates it first
                break
            eta.validation_done(time.perf_counter() - eval_start)
            last_eval = c.step

        if on_step is not None:
            on_step(c.step, {"loss": loss, "lr": run.schedule.lr})

    if stopped in _SIGNALS:  # save the step reached, at once: no validation
        if c.step > (c.last_saved_step or 0):
            _save_checkpoints(run, best=False)
    elif c.step > last_eval:  # the run ended between two scheduled validations
        if not _validation_finished(run, log, on_schedule=False):
            stopped = run.stop.requested
            c.unvalidated_step = c.step  # the resume validates it first
            _save_checkpoints(run, best=False)
    c.elapsed = time.perf_counter() - run.session_start
    if stopped is None:
        stopped = "early_stop" if _early_stopped(run) else "max_steps"
    _show_progress(run, bar, eta, left=0.0)  # nothing left of this session
    if train_loss is None and c.window_tokens:
        train_loss = c.window_loss / c.window_tokens
    return stopped, train_loss, session_tokens / train_time if train_time else 0.0


_SIGNALS = ("SIGINT", "SIGTERM")  # `stopped` values of a run stopped by a signal


def _stop_requested(run: _Run, eta: _Eta) -> str | None:
    """Why the loop must stop before the next step: a signal, or train.max_time."""
    if run.stop is not None and run.stop.requested is not None:
        return run.stop.requested
    # stop early enough that the next step and the final validation fit in the budget
    if time.perf_counter() + eta.next_step_and_validation() >= run.deadline:
        budget, step = run.cfg.train.max_time, run.counters.step
        logger.info("train.max_time=%s reached at step %d: stopping", budget, step)
        return "max_time"
    return None


class _Eta:
    """Time estimates of this session: the steps still to take, and the next step.

    Seconds per step are averaged over this session's steps after the first (which
    pays for warm-up); validations are timed separately and spread over the steps
    between them. The first estimate is logged after a few steps.
    """

    _FIRST_REPORT = 3  # steps taken (the first one not timed) before the estimate is logged
    _BOUND_HINT = 20 * 60  # seconds to go beyond which the estimate says how to bound a run

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.steps = 0
        self.step_seconds = 0.0  # summed over the steps after the first
        self.validation_seconds: float | None = None  # the last validation's duration

    def step_done(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:
            self.step_seconds += seconds
        if self.steps == self._FIRST_REPORT and self.run.dist.is_main:
            self._report()

    def validation_done(self, seconds: float) -> None:
        self.validation_seconds = seconds

    def per_step(self) -> float | None:
        return self.step_seconds / (self.steps - 1) if self.steps > 1 else None

    def next_step_and_validation(self) -> float:
        return (self.per_step() or 0.0) + (self.validation_seconds or 0.0)

    def left(self) -> float | None:
        """Seconds to the end of the run (or of train.max_time, when sooner)."""
        per_step = self.per_step()
        if per_step is None:
            return None
        t, step = self.run.cfg.train, self.run.counters.step
        steps_left = max(0, t.max_steps - step)
        validations = steps_left // t.eval_every + 1
        seconds = steps_left * per_step + validations * (self.validation_seconds or 0.0)
        return min(seconds, max(0.0, self.run.deadline - time.perf_counter()))

    def _report(self) -> None:
        left = self.left()
        budget = self.run.cfg.train.max_time
        capped = f" (train.max_time={budget})" if budget is not None else ""
        if budget is None and (left or 0.0) > self._BOUND_HINT:
            capped = "; train.max_time=15m bounds a run (Ctrl-C stops it; --resume goes on)"
        logger.info(
            "about %s to go: %d steps at %.2f s/step, plus validations%s",
            format_duration(left or 0.0),
            max(0, self.run.cfg.train.max_steps - self.run.counters.step),
            self.per_step() or 0.0,
            capped,
        )


def _early_stopped(run: _Run) -> bool:
    patience = run.cfg.train.early_stop_patience
    return patience > 0 and run.schedule.bad >= patience


def _validation_finished(run: _Run, log: MetricsLog, *, on_schedule: bool) -> bool:
    """:func:`_evaluate_and_save`, unless SIGINT/SIGTERM ends the validation (or its
    temperature search) at once: then nothing is recorded or saved and the step reached
    is saved without it as the loop stops (False)."""
    try:
        _evaluate_and_save(run, log, on_schedule=on_schedule)
    except StopRequested as exc:
        run.model.train()
        logger.warning("%s: validation of step %d abandoned", exc, run.counters.step)
        return False
    return True


def _evaluate_and_save(run: _Run, log: MetricsLog, *, on_schedule: bool) -> None:
    """Validate, log, and save ``best.pt`` (if improved) and ``last.pt``.

    Only scheduled validations (every ``eval_every`` steps) drive the learning-rate
    schedule and early stopping, so a run cut short by ``max_steps`` and resumed
    follows the same schedule as one that never stopped.
    """
    c = run.counters
    start = time.perf_counter()
    with run.stop.interruptible() if run.stop is not None else contextlib.nullcontext():
        c.valid_loss, scored = _validate(run)  # a signal ends it early (StopRequested)
    speed = scored / max(time.perf_counter() - start, 1e-9)
    if on_schedule:
        run.schedule.update(c.valid_loss)
    c.elapsed = time.perf_counter() - run.session_start
    record = metrics_for(c.valid_loss, run.corpus.level)
    if run.averager.active:
        record["averaged_steps"] = run.averager.count  # scored with the averaged weights
    if run.cfg.train.eval_temperature_tokens:
        record["temperature"] = run.valid_temperature
    bad_evals = run.cfg.train.average_after_bad_evals
    if on_schedule and bad_evals and not run.averager.active and run.schedule.bad >= bad_evals:
        _start_averaging(run, f"{run.schedule.bad} validations without improvement")
    logger.info(
        "step %d: valid loss %.4f, %s %.3f",
        c.step,
        c.valid_loss,
        metric_name(run.corpus.level),
        record[metric_name(run.corpus.level)],
    )
    log.write(_record(run, "valid", record, speed))
    improved = c.valid_loss < c.best_saved_loss
    if improved:
        c.best_saved_loss = c.valid_loss
    _save_checkpoints(run, best=improved)


def _save_checkpoints(run: _Run, *, best: bool) -> None:
    """Save ``last.pt`` (the one it replaces kept as ``last.prev.pt``) and maybe ``best.pt``.

    Every rank must call this (the payload gathers state from all); rank 0 writes,
    and an error writing (e.g. a full disk) is raised on every rank.
    """
    diverged = nonfinite_weights(run.model)  # never replace a usable checkpoint with these
    if diverged is not None:
        raise NonFiniteLossError(
            f"the weights diverged by step {run.counters.step}: {diverged}; nothing saved. "
            + _checkpoint_note(run)
        )
    c = run.counters
    c.nonfinite_streak = 0  # progress is saved: the allowance starts over
    if run.session_start:  # in the loop: the checkpoint holds the time trained so far
        c.elapsed = time.perf_counter() - run.session_start
    payload = _payload(run)

    def save() -> None:
        check_writer(run.run_dir)  # still the folder this run locked: else write nothing
        if best:
            save_checkpoint(run.run_dir / "best.pt", payload, keep_previous=True)
        save_checkpoint(run.run_dir / "last.pt", payload, keep_previous=True)

    distributed.run_on_main(save, run.dist)
    run.counters.last_saved_step = run.counters.step


# --------------------------------------------------------------------------- non-finite losses


def _on_nonfinite(run: _Run, log: MetricsLog, loss: float) -> str:
    """Apply ``train.nonfinite`` to a NaN/inf training loss: ``"skip"`` or ``"rollback"``.

    Raises:
        NonFiniteLossError: the policy is ``stop``, or more than ``train.max_nonfinite``
            non-finite losses came since the last checkpoint.
    """
    t, c = run.cfg.train, run.counters
    if t.nonfinite == "stop":
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) at step {c.step}; stopping. "
            + _checkpoint_note(run)
        )
    c.nonfinite_streak += 1
    if c.nonfinite_streak > t.max_nonfinite:
        raise NonFiniteLossError(
            f"non-finite training loss ({loss}) at step {c.step}: {c.nonfinite_streak} since "
            f"the last checkpoint, more than train.max_nonfinite={t.max_nonfinite}; "
            "stopping. " + _checkpoint_note(run)
        )
    if t.nonfinite == "skip":
        c.skipped_steps += 1
        logger.warning("non-finite training loss (%s) at step %d: step skipped", loss, c.step)
        return "skip"
    _rollback(run, log)
    return "rollback"


def _rollback(run: _Run, log: MetricsLog) -> None:
    """Go back to the newest good ``last.pt`` with the learning rate lowered."""
    c = run.counters
    failed, streak, rollbacks = c.step, c.nonfinite_streak, c.rollbacks + 1
    payload = distributed.run_on_main(lambda: _load_last(run.run_dir), run.dist)
    _restore(run, distributed.broadcast_object(payload, run.dist))
    del payload
    c = run.counters  # a new object, from the checkpoint
    c.nonfinite_streak, c.rollbacks = streak, rollbacks
    c.elapsed = time.perf_counter() - run.session_start  # wall time goes on
    run.schedule.lr *= run.cfg.train.rollback_lr_factor
    log.rewind(c.step)  # the steps after it will be taken again
    logger.warning(
        "non-finite training loss at step %d: rolled back to step %d, learning rate now %.3g",
        failed,
        c.step,
        run.schedule.lr,
    )


def _record(run: _Run, split: str, metrics: dict[str, float], speed: float) -> dict[str, Any]:
    return {
        "step": run.counters.step,
        "split": split,
        **metrics,
        "lr": run.schedule.lr,
        "tokens_per_s": round(speed, 1),
        "elapsed": round(run.counters.elapsed, 3),
    }


def _show_progress(run: _Run, bar: Any, eta: _Eta, left: float | None = None) -> None:
    """The bar's fields after every step: the training loss and speed since the last log
    line (or the latest logged ones), and the time left (``left``, else the estimate)."""
    if bar.disable:
        return
    c, fields = run.counters, run.bar_fields
    if c.window_tokens:
        loss, level = c.window_loss / c.window_tokens, run.corpus.level
        name = metric_name(level)
        fields.update(loss=f"{loss:.3f}", **{name: f"{metrics_for(loss, level)[name]:.2f}"})
        if c.window_time:
            fields["tok_s"] = f"{c.window_tokens / c.window_time:.0f}"
    left = eta.left() if left is None else left
    fields["left"] = "?" if left is None else format_duration(left)
    bar.set_postfix(fields, refresh=False)  # shown at the bar's next refresh


def _log_train(
    run: _Run, log: MetricsLog, bar: Any, loss: float, speed: float, eta: _Eta
) -> None:
    metrics = metrics_for(loss, run.corpus.level)
    log.write(_record(run, "train", metrics, speed))
    name = metric_name(run.corpus.level)
    left = eta.left()
    left_text = "?" if left is None else format_duration(left)
    if bar.disable:
        logger.info(
            "step %d: train loss %.4f, %s %.3f, %.0f tokens/s, %s left",
            run.counters.step,
            loss,
            name,
            metrics[name],
            speed,
            left_text,
        )


def _log_start(run: _Run, resume: bool) -> None:
    what = f"resuming from step {run.counters.step}" if resume else "starting"
    threads = f" ({run.counters.threads} CPU threads)" if run.device.type == "cpu" else ""
    logger.info("%s in %s on %s%s", what, run.run_dir, run.device, threads)
    logger.info(
        "%r; model %s with %s parameters%s",
        run.corpus,
        run.cfg.model.kind,
        f"{count_parameters(run.model):,}",
        f"; autocast {run.amp_dtype}" if run.amp_dtype is not None else "",
    )
    if resume and run.counters.step >= run.cfg.train.max_steps:
        logger.warning(
            "the run is already at step %d >= train.max_steps=%d; raise train.max_steps to "
            "train further",
            run.counters.step,
            run.cfg.train.max_steps,
        )


def _results(run: _Run, stopped: str, train_loss: float | None, speed: float) -> dict[str, Any]:
    c, level = run.counters, run.corpus.level
    name = metric_name(level)
    out: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "step": c.step,
        "epoch": c.epoch,
        "train_loss": train_loss,
        "valid_loss": c.valid_loss,
        f"valid_{name}": None if c.valid_loss is None else metrics_for(c.valid_loss, level)[name],
        "best_valid_loss": c.best_saved_loss,
        f"best_valid_{name}": metrics_for(c.best_saved_loss, level)[name],
        "tokens_per_s": speed,
        "elapsed": c.elapsed,
        "stopped": stopped,
        "skipped_steps": c.skipped_steps,
        "rollbacks": c.rollbacks,
    }
    return out
