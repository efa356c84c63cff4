"""The ``moglstm`` command line: train, evaluate, generate and list presets.

A thin layer over :mod:`moglstm.lm`: every subcommand parses its arguments and
calls one function there. Errors caused by bad input (config, paths, values) are
printed as one line on stderr with exit status 2; ``--debug`` shows the traceback
instead. ``train``'s dotted ``KEY=VALUE`` overrides may stand anywhere among its
options; every option's help shows its default; a bare ``moglstm`` lists the commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from moglstm.lm.config import (
    RunConfig,
    apply_overrides,
    list_presets,
    load_config,
    load_preset,
    to_yaml,
)
from moglstm.lm.data import CorpusFetchError
from moglstm.lm.distributed import env_rank
from moglstm.lm.report import MissingExtraError
from moglstm.lm.runlock import RunLockedError

__all__ = ["QUICKSTART", "build_parser", "main"]

#: The preset ``moglstm train`` trains when given neither a preset nor a corpus.
QUICKSTART = "quickstart"

logger = logging.getLogger("moglstm")

# bad input: one line on stderr, exit 2
_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    CorpusFetchError,
    RunLockedError,
    MissingExtraError,
)

_MAIN_EPILOG = """\
examples:
  moglstm train                                     # the quick start: bundled Shakespeare,
                                                    # about 10 minutes on 2 CPU cores
  moglstm generate runs/quickstart --prompt "ROMEO ." --tokens 60 --top-p 0.9
  moglstm presets                                   # what else can be trained
  moglstm train --preset ptb-small                  # train into runs/ptb-small/
  moglstm train --preset ptb-small model.hidden_size=300 train.max_steps=2000
  moglstm train --preset ptb-small --resume         # continue runs/ptb-small/
  moglstm evaluate runs/ptb-small --split test --batch-size 1

The shakespeare corpus ships with the package. The others are read from
data.data_dir, else $MOGLSTM_DATA, else downloaded to ~/.cache/moglstm.
Run `moglstm COMMAND --help` for each command's options.
"""

_TRAIN_EPILOG = """\
Overrides are dotted KEY=VALUE items applied after the preset, values in YAML
syntax, e.g. model.hidden_size=650 train.betas=[0,0.999] data.corpus=ptb-char;
they may come before, between or after the options. Without --preset the base
is the quickstart preset, or the built-in defaults when the overrides choose a
corpus (data.corpus=...). `moglstm presets NAME` shows every key.
The run folder <out_dir>/<name>/ gets config.yaml, metrics.jsonl, best.pt and
last.pt; a new run never overwrites an existing run folder.

Stopping: Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves last.pt
at the step reached and says how to resume; a second Ctrl-C quits at once.
train.max_time=90m (or 1h30m, 45s, ...) stops cleanly within that wall-clock
time, final validation and checkpoint included.

--resume continues a stopped run from its last.pt with the checkpoint's config,
bit for bit on CPU. Only these may be overridden when resuming: train.max_steps,
train.eval_every, train.log_every, train.early_stop_patience,
train.eval_max_tokens, train.device, train.amp, data.eval_batch_size and where
the data lives (data.data_dir, data.cache_dir, data.path, data.*_path).

examples:
  moglstm train                                      # quickstart: runs/quickstart
  moglstm train --preset ptb-small
  moglstm train --preset ptb-small --name wide model.hidden_size=300
  moglstm train data.corpus=text data.path=my_corpus/ --name mine train.max_steps=30
  moglstm train data.corpus=text data.path=my_corpus/ data.level=char --name mine-char
  moglstm train --preset ptb-small train.max_time=90m
  moglstm train --preset ptb-small --resume train.max_steps=8000
  moglstm train --resume runs/wide                   # a run folder, anywhere
  moglstm train --preset ptb-small --print-config    # show the resolved config
  torchrun --nproc_per_node=4 -m moglstm train --preset ptb-small   # 4 GPUs, data-parallel

Under torchrun each process takes data.batch_size / N of the streams (the batch
size must divide by N) and only rank 0 writes files; a dead or stalled process
stops the others after train.dist_timeout seconds (300). train.nonfinite=skip or
rollback keeps a run going through a NaN/inf loss (default: stop). A model whose
training cannot fit in memory is refused before it is built, with the numbers
(train.check_memory=false tries anyway). See docs/reliability.md.
"""

_EVALUATE_EPILOG = """\
Scores the whole split with the model state carried across windows. Word-level
corpora report perplexity, character-level ones bits per character. With a batch
size B > 1 the split is cut into B streams and B - 1 + (length mod B) tokens are
not scored; --batch-size 1 scores every token (the paper's protocol).

The paper's protocol adds --temperature auto (a softmax temperature searched on
the first --temperature-tokens of the validation split, applied to the split
scored), --mc-samples S (mean probability over S dropout samples, rates times
--mc-dropout-scale) and --dynamic (dynamic evaluation: the model keeps learning
on the split as it scores it; RMS variant, see docs/reproduce.md). Defaults:
--dynamic-lr 3e-05, --dynamic-decay 0.001, --dynamic-eps 0.0001, --dynamic-bptt 5,
--dynamic-grad-batches all (windows of the training split for the gradient RMS).

examples:
  moglstm evaluate runs/ptb-small                          # valid split, best.pt
  moglstm evaluate runs/ptb-small --split test --batch-size 1
  moglstm evaluate runs/ptb-small/last.pt --json
  moglstm evaluate runs/ptb-paper --split test --batch-size 1 --temperature auto
  moglstm evaluate runs/ptb-paper --split test --batch-size 1 --dynamic
"""

_GENERATE_EPILOG = """\
The prompt is tokenized like the corpus: words separated by spaces, punctuation
as separate words ("ROMEO ." for the shakespeare corpus). Words the model does
not know are read as <unk> (a warning names them); <unk> itself is never
generated unless --allow-unk. Penn Treebank models (ptb, ptb-char) know
lowercase text only, with every number written N and rare words <unk>: prompt
them with "the company said" rather than "The Company said 12". Temperature 0
or --greedy takes the most likely token each time (it tends to repeat itself;
sampling with --top-p 0.9 reads better).

examples:
  moglstm generate runs/quickstart --prompt "ROMEO ." --tokens 60 --top-p 0.9
  moglstm generate runs/ptb-small --prompt "the stock market" --tokens 40
  moglstm generate runs/ptb-char-small --prompt "the " --tokens 200 --top-p 0.9 --seed 1
  moglstm generate runs/ptb-small --prompt "the company said" --greedy --tokens 20
"""


# --------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' layout and shows every option's default in its help.

    An option whose help already says its default (``default: the run's``) is left
    as it is; flags show ``(default: off)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is argparse.SUPPRESS
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: off)".lstrip()
        value = action.default
        if isinstance(value, (list, tuple)):
            value = " ".join(map(str, value))
        return f"{text} (default: {value})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    """The ``moglstm`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="moglstm",
        description="Mogrifier LSTM language models: train, evaluate and sample from them.",
        epilog=_MAIN_EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_generate(sub)
    _add_presets(sub)
    _add_benchmark(sub)
    for module in ("report", "tune"):  # their options live beside their code in moglstm.lm
        _add_tool(sub, module)
    return parser


def _version() -> str:
    from moglstm import __version__

    return __version__


def _subparser(sub: Any, name: str, help: str, description: str, epilog: str | None):
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.set_defaults(parser_=p)  # for errors found after parsing (see main)
    return p


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (the error names the option and value)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _float_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"must be in {bracket}{low:g}, {high:g}], got {text}"
            )
        return value

    parse.__name__ = "number"
    return parse


_POSITIVE = _int_at_least(1)


def _add_train(sub: Any) -> None:
    p = _subparser(
        sub,
        "train",
        "train a language model",
        "Train a language model from a preset and/or KEY=VALUE overrides, saving "
        "checkpoints and metrics in <out_dir>/<name>/.",
        _TRAIN_EPILOG,
    )
    p.add_argument(
        "--preset",
        metavar="NAME|PATH",
        help="shipped preset (see `moglstm presets`) or YAML file (default: "
        f"{QUICKSTART}, the bundled Shakespeare corpus, about 10 minutes on 2 CPU cores; "
        "with a data.corpus override, the built-in defaults)",
    )
    p.add_argument("--name", help="run name: the run folder's name (default: the preset's)")
    p.add_argument("--out-dir", metavar="DIR", help="folder holding run folders (default: runs)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN",
        help="continue the run <out_dir>/<name> (or the run folder RUN) from its last.pt "
        "(default: off, a new run)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub: Any) -> None:
    p = _subparser(
        sub,
        "evaluate",
        "score a trained model on a split",
        "Compute the loss and perplexity (or bits per character) of a trained run on a "
        "whole split.",
        _EVALUATE_EPILOG,
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint file")
    p.add_argument(
        "--split", choices=("valid", "test", "train"), default="valid", help="split to score"
    )
    p.add_argument(
        "--batch-size", type=_POSITIVE, metavar="N", help="parallel streams (default: the run's)"
    )
    p.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="a run folder's checkpoint"
    )
    p.add_argument("--bptt", type=_POSITIVE, metavar="N", help="window length (default: the run's)")
    p.add_argument(
        "--max-tokens",
        type=_POSITIVE,
        metavar="N",
        help="score only the first ~N tokens (default: the whole split)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--data-dir", metavar="DIR", help="where the corpus is (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_protocol_options(p)
    p.set_defaults(func=_cmd_evaluate)


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    from moglstm.lm.dynamic_eval import DynamicEvalSettings

    d = DynamicEvalSettings()
    p.add_argument(
        "--temperature",
        metavar="auto|T",
        help="softmax temperature (logits / T), or 'auto' to search it on the start of "
        "the validation split (default: 1)",
    )
    p.add_argument(
        "--temperature-tokens",
        type=_POSITIVE,
        default=20000,
        metavar="N",
        help="validation tokens --temperature auto searches on (default: 20000)",
    )
    p.add_argument(
        "--mc-samples",
        type=_int_at_least(0),
        default=0,
        metavar="S",
        help="Monte-Carlo dropout samples (0: no dropout)",
    )
    p.add_argument(
        "--mc-dropout-scale",
        type=float,
        default=1.0,
        metavar="M",
        help="multiply every dropout rate by M while sampling (default: 1)",
    )
    p.add_argument("--dynamic", action="store_true", help="dynamic evaluation")
    p.add_argument("--dynamic-lr", type=float, default=d.lr, metavar="LR", help="step size")
    p.add_argument(
        "--dynamic-decay",
        type=float,
        default=d.decay,
        metavar="LAMBDA",
        help="pull back towards the trained weights",
    )
    p.add_argument("--dynamic-eps", type=float, default=d.eps, metavar="EPS", help="RMS epsilon")
    p.add_argument(
        "--dynamic-bptt", type=_POSITIVE, default=d.bptt, metavar="N", help="window length"
    )
    p.add_argument(
        "--dynamic-grad-batches",
        type=_POSITIVE,
        default=d.grad_batches,
        metavar="N",
        help="training windows for the gradient RMS (default: all)"
        if d.grad_batches is None
        else "training windows for the gradient RMS",
    )


def _add_generate(sub: Any) -> None:
    p = _subparser(
        sub,
        "generate",
        "sample text from a trained model",
        "Continue a prompt with text sampled from a trained run.",
        _GENERATE_EPILOG,
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint file")
    p.add_argument(
        "--prompt",
        default="",
        metavar="TEXT",
        help="text to continue (default: empty, the start of a line)",
    )
    p.add_argument("--tokens", type=_POSITIVE, default=50, metavar="N", help="tokens to generate")
    p.add_argument(
        "--temperature",
        type=_float_in(0, math.inf),
        default=1.0,
        metavar="T",
        help=">= 0; below 1 is more conservative, 0 is greedy",
    )
    p.add_argument(
        "--top-k", type=_int_at_least(0), default=0, metavar="K", help="0 keeps all tokens"
    )
    p.add_argument(
        "--top-p",
        type=_float_in(0, 1, low_open=True),
        default=1.0,
        metavar="P",
        help="in (0, 1]; 1 keeps all tokens",
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument(
        "--allow-unk", action="store_true", help="let the model generate <unk> (unknown word)"
    )
    p.add_argument(
        "--seed", type=int, metavar="S", help="seed for repeatable samples (default: random)"
    )
    p.add_argument(
        "--checkpoint", choices=("best", "last"), default="best", help="a run folder's checkpoint"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_generate)


def _add_presets(sub: Any) -> None:
    p = _subparser(
        sub,
        "presets",
        "list the shipped presets",
        "List the shipped presets, or print one preset's full config.",
        "examples:\n  moglstm presets\n  moglstm presets ptb-small",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="print this preset's full config")
    p.set_defaults(func=_cmd_presets)


_BENCHMARK_EPILOG = """\
Times torch.nn.LSTM and MogrifierLSTM (reference and fused paths) of the same
shape in one process, interleaved, and prints the median milliseconds, the
ratio to torch.nn.LSTM, that ratio over the arithmetic floor 1 + r*k(I+H)/(4H(I+H))
(the Mogrifier's extra multiply-adds), tokens/s and the peak memory of a
training step. 'forward' is inference (no autograd); 'train' is forward +
backward. The default grid: B=64 T=70 H=512 L=2 r=5 k=84, B=16 H=256, B=64 H=1024.

examples:
  moglstm benchmark                                   # the default grid
  moglstm benchmark --shape B=64,T=70,H=512,L=2,r=5,k=84 --runs 20
  moglstm benchmark --shape B=16,H=256 --impl torch fused --mode train --json out.json
  moglstm benchmark --device cuda --dtype bfloat16 --shape B=64,T=70,H=1024,L=2,r=5,k=84
  moglstm benchmark --device cuda --dtype tf32 --impl torch triton
"""


def _add_benchmark(sub: Any) -> None:
    from moglstm.lm.benchmark import DEFAULT_IMPLEMENTATIONS, DTYPES, IMPLEMENTATIONS, MODES

    p = _subparser(
        sub,
        "benchmark",
        "time MogrifierLSTM against torch.nn.LSTM",
        "Time MogrifierLSTM against torch.nn.LSTM of the same shape.",
        _BENCHMARK_EPILOG,
    )
    p.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="SPEC",
        help="B=..,T=..,H=..,I=..,L=..,r=..,k=.. (k=none: full rank); repeatable "
        "(default: the grid below)",
    )
    defaults = "; ".join(f"{k}: {' '.join(v)}" for k, v in DEFAULT_IMPLEMENTATIONS.items())
    p.add_argument(
        "--impl", nargs="+", choices=IMPLEMENTATIONS, help=f"default by device ({defaults})"
    )
    p.add_argument(
        "--mode", nargs="+", choices=MODES, default=list(MODES), help="what to time"
    )
    p.add_argument("--runs", type=_POSITIVE, default=20, help="timed runs per implementation")
    p.add_argument("--warmup", type=_int_at_least(0), default=3, help="untimed runs first")
    p.add_argument("--device", type=_benchmark_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="tf32: float32, TF32 products"
    )
    p.add_argument(
        "--threads",
        type=_POSITIVE,
        help="torch.set_num_threads before timing (default: torch's choice)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON here (default: no file)"
    )
    p.set_defaults(func=_cmd_benchmark)


def _add_tool(sub: Any, module: str) -> None:
    """A subcommand defined by ``moglstm.lm.<module>``: its ``COMMAND`` (help, description,
    epilog), ``add_arguments(parser)`` and ``command(args)``, whose results (a dict) if any
    are printed like train's."""
    import importlib

    tool = importlib.import_module(f"moglstm.lm.{module}")
    p = _subparser(sub, module, *tool.COMMAND)
    tool.add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        results = tool.command(args)
        if results is not None:
            _print_results(results, args.json)
        return 0

    p.set_defaults(func=run)


# --------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    from moglstm.lm.train import resume_config, train

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume key=value`: argparse took the first override for the optional RUN
        args.overrides.insert(0, args.resume)
        args.resume = True
    if args.resume:
        overrides = _without_location(args.overrides)
        # a preset named with --resume must describe the run being resumed
        preset = None if args.preset is None else load_config(args.preset, overrides)
        cfg = resume_config(_resume_dir(args), overrides, preset)
    else:
        cfg = load_config(_preset(args), [*args.overrides, *_location_overrides(args)])
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    args.run_dir = Path(cfg.out_dir) / cfg.name  # for the message if interrupted
    results = train(cfg, resume=bool(args.resume), quiet=args.quiet)
    if not _is_rank0():  # under torchrun, one copy of the (identical) results
        return 0
    _print_results(results, args.json)
    stopped, step = results["stopped"], results["step"]
    if stopped in ("SIGINT", "SIGTERM", "max_time"):
        why = "train.max_time ran out" if stopped == "max_time" else f"{stopped} received"
        print(
            f"moglstm train: stopped at step {step} ({why}); last.pt holds it. "
            f"Continue with: {_resume_command(args.run_dir)}",
            file=sys.stderr,
        )
    return _SIGNAL_EXIT.get(stopped, 0)


# the usual shell statuses of a process ended by these signals (the work is saved)
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def _resume_command(run_dir: Path) -> str:
    return f"moglstm train --resume {shlex.quote(str(run_dir))}"


def _interrupted_note(args: argparse.Namespace) -> str:
    """What a second Ctrl-C during ``train`` leaves behind, and how to go on."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None:
        return ""
    if not (run_dir / "last.pt").is_file():
        return " before the first checkpoint: nothing was saved"
    return f"; last.pt is kept. Continue with: {_resume_command(run_dir)}"


def _preset(args: argparse.Namespace) -> str | None:
    """``--preset``; without it the quick start, unless the overrides choose a corpus
    (then the built-in defaults are the base, as in :func:`~moglstm.lm.config.load_config`)."""
    if args.preset is not None:
        return args.preset
    keys = {item.partition("=")[0].strip() for item in args.overrides}
    return None if keys & {"data", "data.corpus"} else QUICKSTART


def _location_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if args.name is not None:
        out.append(f"name={args.name}")
    if args.out_dir is not None:
        out.append(f"out_dir={args.out_dir}")
    return out


def _is_location(item: str) -> bool:
    return item.partition("=")[0].strip() in ("name", "out_dir")


def _without_location(overrides: Sequence[str]) -> list[str]:
    return [o for o in overrides if not _is_location(o)]


def _resume_dir(args: argparse.Namespace) -> Path:
    """The run folder to resume: ``--resume RUN``, else ``<out_dir>/<name>``."""
    location = [o for o in args.overrides if _is_location(o)] + _location_overrides(args)
    if isinstance(args.resume, str):
        if location:
            raise ValueError(
                "give either --resume RUN or --name/--out-dir (name=/out_dir=), not both"
            )
        return Path(args.resume)
    preset = _preset(args)
    base = RunConfig() if preset is None else load_preset(preset)
    base = apply_overrides(base, location)
    return Path(base.out_dir) / base.name


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from moglstm.lm.evaluate import evaluate

    results = evaluate(
        args.run,
        args.split,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
        device=args.device,
        bptt=args.bptt,
        max_tokens=args.max_tokens,
        data_dir=args.data_dir,
        progress=not args.quiet,
        **_protocol_kwargs(args),
    )
    _print_results(results, args.json)
    return 0


def _protocol_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate``'s temperature, Monte-Carlo and dynamic-evaluation arguments."""
    from moglstm.lm.dynamic_eval import DynamicEvalSettings

    temperature = args.temperature
    if temperature is not None and temperature != "auto":
        try:
            temperature = float(temperature)
        except ValueError:
            raise ValueError(
                f"--temperature {args.temperature!r}: give a number > 0 or 'auto'"
            ) from None
    dynamic = None
    if args.dynamic:
        dynamic = DynamicEvalSettings(
            lr=args.dynamic_lr,
            decay=args.dynamic_decay,
            eps=args.dynamic_eps,
            bptt=args.dynamic_bptt,
            grad_batches=args.dynamic_grad_batches,
        )
    return {
        "temperature": temperature,
        "temperature_tokens": args.temperature_tokens,
        "mc_samples": args.mc_samples,
        "mc_dropout_scale": args.mc_dropout_scale,
        "dynamic": dynamic,
    }


def _cmd_generate(args: argparse.Namespace) -> int:
    from moglstm.lm.generate import generate, unknown_words_message

    result = generate(
        args.run,
        args.prompt,
        args.tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        greedy=args.greedy,
        checkpoint=args.checkpoint,
        device=args.device,
        allow_unk=args.allow_unk,
    )
    if result["unknown"]:
        logger.warning("%s", unknown_words_message(result))
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from moglstm.lm.benchmark import DEFAULT_GRID, run_benchmark

    if args.json is not None:
        _check_writable(Path(args.json), "--json")  # before minutes of timing, not after
    _check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shape or list(DEFAULT_GRID)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    results = run_benchmark(
        shapes,
        args.impl,
        args.mode,
        runs=args.runs,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        memory=not args.no_memory,
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def _shape(text: str) -> Any:
    """argparse type of ``benchmark --shape``."""
    from moglstm.lm.benchmark import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _benchmark_device(text: str) -> str:
    """argparse type of ``benchmark --device``: cpu, cuda or cuda:N, and present."""
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind != "cuda" or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text  # whether the device is there is checked before timing (_check_device)


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (0-based)"
        )


def _check_writable(path: Path, flag: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder: give a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {str(path)!r}: folder {str(path.parent)!r} does not exist")


def _cmd_presets(args: argparse.Namespace) -> int:
    if args.name is not None:
        print(to_yaml(load_preset(args.name)), end="")
        return 0
    names = list_presets()
    width = max(map(len, names))
    for name in names:
        print(f"{name:<{width}}  {_preset_summary(name)}")
    return 0


def _preset_summary(name: str) -> str:
    """First phrase of the preset file's leading comment, and its key settings."""
    text = (resources.files("moglstm.lm") / "presets" / f"{name}.yaml").read_text("utf-8")
    comment = " ".join(
        line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")
    )
    phrase = comment.split(": ")[0].split(". ")[0].rstrip(".:")
    cfg = load_preset(name)
    m = cfg.model
    shape = (
        f"{m.depth}x{m.d_model}" if m.kind == "transformer" else f"{m.num_layers}x{m.hidden_size}"
    )
    if m.num_params is not None:  # the hidden size is solved for the budget
        shape = f"{m.num_layers} layers, {m.num_params} parameters"
    settings = f"[{cfg.data.corpus}, {m.kind} {shape}, {cfg.train.max_steps} steps]"
    return f"{phrase} {settings}" if phrase else settings


def _print_results(results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results))
        return
    for key, value in results.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"{key}: {shown}")


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moglstm`` command line; returns the exit status.

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if args.command is None:  # a bare `moglstm`: what can it do?
        parser.print_help()
        return 0
    if extras:
        _take_overrides(args, extras)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    quiet = getattr(args, "quiet", False) or not _is_rank0()  # torchrun: rank 0 reports
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def _take_overrides(args: argparse.Namespace, extras: list[str]) -> None:
    """KEY=VALUE items argparse left over (after an option) join ``train``'s overrides;
    anything else is an error of the subcommand (its usage, not the top level's)."""
    unknown = [
        e for e in extras if not (hasattr(args, "overrides") and _looks_like_override(e))
    ]
    if unknown:
        hint = ""
        if hasattr(args, "overrides") and any(e.startswith("--") and "." in e for e in unknown):
            hint = " (config keys are given as KEY=VALUE, e.g. train.max_steps=100, no dashes)"
        args.parser_.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    args.overrides.extend(extras)


def _looks_like_override(item: str) -> bool:
    key, sep, _ = item.partition("=")
    return bool(sep and key) and not item.startswith("-")


def _is_rank0() -> bool:
    """Whether this process reports: not started by torchrun, or its rank 0."""
    try:
        return env_rank() == 0
    except ValueError:  # a malformed $RANK: training reports it
        return True


def _run(args: argparse.Namespace) -> int:
    from moglstm.lm.budget import allocation_failure
    from moglstm.lm.distributed import PeerLostError
    from moglstm.lm.train import NonFiniteLossError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        note = _interrupted_note(args) if args.command == "train" else ""
        print(f"moglstm {args.command}: interrupted{note}", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"moglstm {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, PeerLostError, OSError) as exc:
        if args.debug:
            raise
        print(f"moglstm {args.command}: failed: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        message = allocation_failure(exc, args.command)
        if message is None or args.debug:
            raise  # not an allocation: an internal error shows its traceback
        print(f"moglstm {args.command}: failed: {message}", file=sys.stderr)
        return 1


_MAX_MESSAGE = 2000  # characters of an error shown: messages never grow with the input


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    text = f"{head} {'; '.join(rest)}" if head.endswith(":") and rest else "; ".join(lines)
    if len(text) > _MAX_MESSAGE:
        text = f"{text[: _MAX_MESSAGE - 40]}... ({len(text) - _MAX_MESSAGE + 40:,} more characters)"
    return text
