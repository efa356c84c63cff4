"""Time training steps of the paper presets and extrapolate to 1000 steps.

Trains each preset for a few steps (validation capped to a few hundred tokens, so
it barely counts) and reports the training speed that ``train`` measures (the
steps alone: forward, backward, clip, update). Time per 1000 steps is
``1000 * batch * bptt / tokens_per_s``, an extrapolation from the steps timed.

Usage (from the repository root; corpora in $MOGLSTM_DATA or --data-dir)::

    python experiments/time_presets.py --data-dir /path/to/data \
        --preset ptb-paper:20 --preset ptb-paper-lstm:20 --device cpu

Each ``--preset NAME:STEPS[:KEY=VALUE,...]`` times NAME for STEPS steps, with
optional overrides (e.g. ``enwik8-paper:2:data.corpus=ptb-char`` times the enwik8
model on PTB characters where enwik8 is not at hand). Results are printed as a
Markdown table and, with ``--json PATH``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import torch

from moglstm.lm.config import load_config
from moglstm.lm.train import train


def time_preset(name: str, steps: int, device: str, out_dir: str, extra: list[str]) -> dict:
    cfg = load_config(
        name,
        [
            *extra,
            f"out_dir={out_dir}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps + 1}",
            f"train.log_every={steps}",
            "train.eval_max_tokens=200",
            f"train.device={device}",
        ],
    )
    result = train(cfg, quiet=True)
    tokens = cfg.data.batch_size * cfg.data.bptt
    seconds_per_step = tokens / result["tokens_per_s"]
    return {
        "preset": name + (f" ({', '.join(extra)})" if extra else ""),
        "steps_timed": steps,
        "batch": f"{cfg.data.batch_size} x {cfg.data.bptt}",
        "seconds_per_step": round(seconds_per_step, 3),
        "hours_per_1000_steps": round(seconds_per_step * 1000 / 3600, 2),
        "tokens_per_s": round(result["tokens_per_s"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", required=True, metavar="NAME:STEPS[:K=V,..]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--data-dir", default=None, help="corpora folder (default: $MOGLSTM_DATA)")
    args = p.parse_args(argv)
    where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for item in args.preset:
            name, _, rest = item.partition(":")
            steps, _, extra = rest.partition(":")
            overrides = [o for o in extra.split(",") if o]
            if args.data_dir:
                overrides.insert(0, f"data.data_dir={args.data_dir}")
            rows.append(time_preset(name, int(steps or 20), args.device, out_dir, overrides))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.device} ({where}), torch {torch.__version__}\n")
    print("| preset | batch | steps timed | s/step | hours per 1000 steps |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['preset']} | {r['batch']} | {r['steps_timed']} | {r['seconds_per_step']} "
            f"| {r['hours_per_1000_steps']} |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": args.device, "where": where, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
