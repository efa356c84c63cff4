"""``moglstm evaluate``: score a trained run on a split (the paper's protocol included)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import textwrap
from typing import Any

from moglstm.cli.common import POSITIVE, int_at_least, print_results, subparser
from moglstm.lm.data.sources import SPLITS
from moglstm.lm.dynamic_eval import DynamicEvalSettings
from moglstm.lm.errors import UserError
from moglstm.lm.evaluate import evaluate
from moglstm.lm.runs.folder import CHECKPOINT_CHOICES
from moglstm.lm.runtime import DEVICE_HELP

__all__ = ["add", "epilog", "run"]

# the library's defaults, shown and used by the options that pass them on
_EVALUATE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(evaluate).parameters.items()
}

_EPILOG = """\
Scores the whole split with the model state carried across windows. Word-level
corpora report perplexity, character-level ones bits per character. With a batch
size B > 1 the split is cut into B streams and B - 1 + (length mod B) tokens are
not scored; --batch-size 1 scores every token (the paper's protocol).

The paper's protocol adds --temperature auto (a softmax temperature searched on
the first --temperature-tokens of the validation split, applied to the split
scored), --mc-samples S (mean probability over S dropout samples, rates times
--mc-dropout-scale) and --dynamic (dynamic evaluation: the model keeps learning
on the split as it scores it; RMS variant, see docs/reproduce.md). Defaults:
{dynamic_defaults}

examples:
  moglstm evaluate runs/ptb-small                          # valid split, best.pt
  moglstm evaluate runs/ptb-small --split test --batch-size 1
  moglstm evaluate runs/ptb-small/last.pt --json
  moglstm evaluate runs/ptb-paper --split test --batch-size 1 --temperature auto
  moglstm evaluate runs/ptb-paper --split test --batch-size 1 --dynamic
"""


def epilog() -> str:
    """The help's epilog; the dynamic-evaluation defaults in it come from the code."""
    defaults = dataclasses.asdict(DynamicEvalSettings())
    shown = ", ".join(
        f"--dynamic-{key.replace('_', '-')} {'all' if value is None else f'{value:g}'}"
        for key, value in defaults.items()
    )
    tail = f"{shown} (windows of the training split for the gradient RMS)."
    return _EPILOG.format(dynamic_defaults=textwrap.fill(tail, 79, break_on_hyphens=False))


def add(sub: Any) -> None:
    """Add ``moglstm evaluate`` to the subcommands ``sub``."""
    p = subparser(
        sub,
        "evaluate",
        "score a trained model on a split",
        "Compute the loss and perplexity (or bits per character) of a trained run on a "
        "whole split.",
        epilog(),
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint file")
    p.add_argument("--split", choices=SPLITS, default="valid", help="split to score")
    p.add_argument(
        "--batch-size", type=POSITIVE, metavar="N", help="parallel streams (default: the run's)"
    )
    p.add_argument(
        "--checkpoint", choices=CHECKPOINT_CHOICES, default="best", help="a run folder's checkpoint"
    )
    p.add_argument("--bptt", type=POSITIVE, metavar="N", help="window length (default: the run's)")
    p.add_argument(
        "--max-tokens",
        type=POSITIVE,
        metavar="N",
        help="score only the first ~N tokens (default: the whole split)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--data-dir", metavar="DIR", help="where the corpus is (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_protocol_options(p)
    p.set_defaults(func=run)


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    d = DynamicEvalSettings()
    p.add_argument(
        "--temperature",
        metavar="auto|T",
        help="softmax temperature (logits / T), or 'auto' to search it on the start of "
        "the validation split (default: 1)",
    )
    p.add_argument(
        "--temperature-tokens",
        type=POSITIVE,
        default=_EVALUATE_DEFAULTS["temperature_tokens"],
        metavar="N",
        help="validation tokens --temperature auto searches on",
    )
    p.add_argument(
        "--mc-samples",
        type=int_at_least(0),
        default=0,
        metavar="S",
        help="Monte-Carlo dropout samples (0: no dropout)",
    )
    p.add_argument(
        "--mc-dropout-scale",
        type=float,
        default=_EVALUATE_DEFAULTS["mc_dropout_scale"],
        metavar="M",
        help="multiply every dropout rate by M while sampling",
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
        "--dynamic-bptt", type=POSITIVE, default=d.bptt, metavar="N", help="window length"
    )
    p.add_argument(
        "--dynamic-grad-batches",
        type=POSITIVE,
        default=d.grad_batches,
        metavar="N",
        help="training windows for the gradient RMS (default: all)"
        if d.grad_batches is None
        else "training windows for the gradient RMS",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm evaluate``; returns the exit status."""
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
    print_results(results, args.json)
    return 0


def _protocol_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate``'s temperature, Monte-Carlo and dynamic-evaluation arguments."""
    temperature = args.temperature
    if temperature is not None and temperature != "auto":
        try:
            temperature = float(temperature)
        except ValueError:
            raise UserError(
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
