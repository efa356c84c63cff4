"""``moglstm generate``: continue a prompt with text sampled from a trained run."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

from moglstm.cli.common import POSITIVE, float_in, int_at_least, subparser
from moglstm.lm.runs.folder import CHECKPOINT_CHOICES
from moglstm.lm.runtime import DEVICE_HELP

__all__ = ["add", "run"]

logger = logging.getLogger("moglstm")

_EPILOG = """\
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


def add(sub: Any) -> None:
    """Add ``moglstm generate`` to the subcommands ``sub``."""
    p = subparser(
        sub,
        "generate",
        "sample text from a trained model",
        "Continue a prompt with text sampled from a trained run.",
        _EPILOG,
    )
    p.add_argument("run", metavar="RUN", help="a run folder or a checkpoint file")
    p.add_argument(
        "--prompt",
        default="",
        metavar="TEXT",
        help="text to continue (default: empty, the start of a line)",
    )
    p.add_argument("--tokens", type=POSITIVE, default=50, metavar="N", help="tokens to generate")
    p.add_argument(
        "--temperature",
        type=float_in(0, math.inf),
        default=1.0,
        metavar="T",
        help=">= 0; below 1 is more conservative, 0 is greedy",
    )
    p.add_argument(
        "--top-k", type=int_at_least(0), default=0, metavar="K", help="0 keeps all tokens"
    )
    p.add_argument(
        "--top-p",
        type=float_in(0, 1, low_open=True),
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
        "--checkpoint", choices=CHECKPOINT_CHOICES, default="best", help="a run folder's checkpoint"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm generate``; returns the exit status."""
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
