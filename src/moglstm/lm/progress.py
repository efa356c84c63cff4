"""A progress bar for scoring a split: tokens/s and the running perplexity (or bpc).

Used by :func:`~moglstm.lm.evaluate.evaluate` (plain, temperature/Monte-Carlo and
dynamic evaluation). Like the training bar it is drawn only on a terminal, and only
when asked for (``moglstm evaluate`` asks unless ``--quiet``).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["ScoreProgress"]


class ScoreProgress:
    """A tqdm bar over the tokens of a batchified split.

    Args:
        data: the ``(N, B)`` split being scored (its size gives the bar's total).
        level: ``"word"`` shows the running perplexity, else bits per character.
        desc: the bar's label.
        enabled: ``False`` draws nothing; ``True`` draws on a terminal only.
        max_tokens: the cap on scored tokens, as given to the scoring function.
    """

    def __init__(
        self,
        data: Tensor,
        level: str,
        desc: str,
        *,
        enabled: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        rows, streams = max(data.size(0) - 1, 0), data.size(1) if data.dim() == 2 else 1
        if max_tokens is not None:
            rows = min(rows, -(-max_tokens // max(streams, 1)))
        self.level = level
        self._loss = 0.0
        self._tokens = 0
        self.bar = tqdm(
            total=rows * streams,
            desc=desc,
            unit="tok",
            unit_scale=True,
            dynamic_ncols=True,
            leave=False,
            disable=None if enabled else True,  # None: off when not a terminal
        )

    def update(self, tokens: int, loss_sum: Tensor | float) -> None:
        """Count ``tokens`` more scored tokens whose summed loss (nats) is ``loss_sum``."""
        if self.bar.disable:
            return  # no device sync for a bar nobody sees
        self._loss += float(loss_sum)
        self._tokens += tokens
        mean = self._loss / max(self._tokens, 1)
        if self.level == "word":
            shown = {"ppl": f"{math.exp(min(mean, 700.0)):.2f}"}
        else:
            shown = {"bpc": f"{mean / math.log(2):.4f}"}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(tokens)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ScoreProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
