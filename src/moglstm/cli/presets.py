"""``moglstm presets``: list the shipped presets, or print one's full config."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any

from moglstm.cli.common import subparser
from moglstm.lm.config import list_presets, load_preset, to_yaml

__all__ = ["add", "run"]


def add(sub: Any) -> None:
    """Add ``moglstm presets`` to the subcommands ``sub``."""
    p = subparser(
        sub,
        "presets",
        "list the shipped presets",
        "List the shipped presets, or print one preset's full config.",
        "examples:\n  moglstm presets\n  moglstm presets ptb-small",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="print this preset's full config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``moglstm presets``; returns the exit status."""
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
        f"{m.transformer.depth}x{m.transformer.d_model}"
        if m.kind == "transformer"
        else f"{m.num_layers}x{m.hidden_size}"
    )
    if m.num_params is not None:  # the hidden size is solved for the budget
        shape = f"{m.num_layers} layers, {m.num_params} parameters"
    # the paper's LSTM baselines are Mogrifier models with no rounds: plain LSTMs
    kind = "lstm" if m.kind == "mogrifier" and m.mogrifier.rounds == 0 else m.kind
    settings = f"[{cfg.data.corpus}, {kind} {shape}, {cfg.train.max_steps} steps]"
    return f"{phrase} {settings}" if phrase else settings
