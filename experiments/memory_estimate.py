"""Compare the training-memory estimate (moglstm.lm.budget) with what training takes.

For each shape, estimates training memory with ``check_training_fits`` (which
counts parameters on the ``meta`` device) and then, in a fresh process, builds the
model, takes two training steps (forward, backward, Adam) and reports the growth of
the process's peak memory: the peak resident set on CPU, ``max_memory_allocated``
on CUDA. A ratio below 1 means the estimate is low.

Usage (from the repository root)::

    python experiments/memory_estimate.py --shape lstm,1024,10000,32,35 \
        --shape mogrifier,512,10000,32,35 --shape lstm,256,30000,64,70

Each ``--shape KIND,HIDDEN,VOCAB,BATCH,BPTT`` is one row of the printed table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = """
import json, resource, sys, torch
from torch.nn import functional as F
from moglstm.lm.budget import check_training_fits
from moglstm.lm.config import load_config
from moglstm.lm.models import build_model
from moglstm.lm.policies import make_optimizer

kind, hidden, vocab, batch, bptt, device = sys.argv[1:]
vocab, batch, bptt = int(vocab), int(batch), int(bptt)
cfg = load_config(None, [f"model.kind={kind}", f"model.hidden_size={hidden}",
                         f"data.batch_size={batch}", f"data.bptt={bptt}",
                         f"train.device={device}", "train.check_memory=false"])
device = torch.device(device)
estimate = check_training_fits(cfg, vocab, device)
torch.set_num_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = build_model(cfg.model, vocab).to(device)
optimizer = make_optimizer(model, cfg.train)
x = torch.randint(vocab, (bptt, batch), device=device)
y = torch.randint(vocab, (bptt, batch), device=device)
for _ in range(2):
    logits, _ = model(x, None)
    loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
if device.type == "cuda":
    measured = torch.cuda.max_memory_allocated(device)
else:
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"estimate": estimate.total, "state": estimate.state,
                  "activations": estimate.activations, "measured": measured}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", required=True, metavar="K,H,V,B,T")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| shape | estimate (MB) | measured (MB) | estimate / measured |")
    print("|---|---|---|---|")
    for shape in args.shape:
        fields = shape.split(",")
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, *fields, args.device],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {shape} | {r['estimate'] / 1e6:.0f} | {r['measured'] / 1e6:.0f} | "
            f"{r['estimate'] / r['measured']:.2f} |"
        )


if __name__ == "__main__":
    main()
