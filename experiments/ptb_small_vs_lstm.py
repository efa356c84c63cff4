"""Mogrifier LSTM vs LSTM on Penn Treebank at equal parameters and equal steps (CPU).

Trains the ``ptb-small`` and ``ptb-small-lstm`` presets (about 3.06M parameters
each; same data, dropout and optimiser) one after the other for the same number of
steps, scores both on the whole validation and test splits, and draws the
validation perplexity of each against the step into ``docs/ptb-small-curves.png``.

Usage (from the repository root; corpora in $MOGLSTM_DATA or --data-dir)::

    python experiments/ptb_small_vs_lstm.py --data-dir /path/to/data \
        --steps 400 --eval-every 50 --out-dir /tmp/ptb-small-vs-lstm
    python experiments/ptb_small_vs_lstm.py --plot-only --out-dir /tmp/ptb-small-vs-lstm

It needs matplotlib (``pip install matplotlib``, the ``plot`` extra) for the picture.
This is an experiment, not a test: it takes minutes to hours depending on --steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from moglstm.lm.config import load_config
from moglstm.lm.evaluate import evaluate
from moglstm.lm.train import train

PRESETS = ("ptb-small", "ptb-small-lstm")
LABELS = {"ptb-small": "Mogrifier LSTM (ptb-small)", "ptb-small-lstm": "LSTM (ptb-small-lstm)"}
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps for each model")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validations")
    p.add_argument(
        "--eval-tokens", type=int, default=20000, help="validation tokens per check (curve)"
    )
    p.add_argument("--out-dir", default="runs/ptb-small-vs-lstm", help="where the runs go")
    p.add_argument("--data-dir", default=None, help="corpora folder (default: $MOGLSTM_DATA)")
    p.add_argument("--picture", default=str(REPO / "docs" / "ptb-small-curves.png"))
    p.add_argument("--plot-only", action="store_true", help="only redraw from finished runs")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for both runs, e.g. model.implementation=reference",
    )
    return p.parse_args(argv)


def run_one(preset: str, args: argparse.Namespace) -> dict:
    """Train one preset for ``args.steps`` steps, then score valid and test in full."""
    overrides = [
        f"out_dir={args.out_dir}",
        f"train.max_steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.log_every={min(args.eval_every, 25)}",
        f"train.eval_max_tokens={args.eval_tokens}",
        "train.device=cpu",
        *args.set,
    ]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    cfg = load_config(preset, overrides)
    results = train(cfg, quiet=True)
    run_dir = Path(results["run_dir"])
    scores = {"train": results}
    for split in ("valid", "test"):
        scores[split] = evaluate(run_dir, split, batch_size=10, device="cpu", checkpoint="last")
    (run_dir / "scores.json").write_text(json.dumps(scores, indent=1), encoding="utf-8")
    return scores


def read_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, validation perplexities) from a run's metrics.jsonl."""
    steps, ppls = [], []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["split"] == "valid":
            steps.append(record["step"])
            ppls.append(record["ppl"])
    return steps, ppls


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for preset in PRESETS:
        run_dir = Path(args.out_dir) / preset
        steps, ppls = read_curve(run_dir)
        scores = json.loads((run_dir / "scores.json").read_text(encoding="utf-8"))
        label = f"{LABELS[preset]}: test {scores['test']['ppl']:.1f}"
        ax.plot(steps, ppls, marker="o", markersize=3, label=label)
    ax.set_xlabel("training step (batch 32 x 35 tokens)")
    ax.set_ylabel("validation perplexity (first ~20k tokens)")
    ax.set_yscale("log")
    ax.set_title("PTB, ~3.06M parameters each, equal steps (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.picture).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.picture)
    print(f"wrote {args.picture}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if not args.plot_only:
        for preset in PRESETS:
            scores = run_one(preset, args)
            print(
                f"{preset}: valid ppl {scores['valid']['ppl']:.2f}, "
                f"test ppl {scores['test']['ppl']:.2f}, {scores['train']['elapsed']:.0f} s",
                flush=True,
            )
    plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
