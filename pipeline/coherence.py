"""Degeneration of a completion: is a "refusal" real text, or garbage that happens to match?

Two measures per completion, written beside it by the generate job:

* repetition: the fraction of token n-grams (n = 3) that already occurred earlier in
  the same completion. Loops ("I I I I", "sorry sorry sorry") score near 1; ordinary
  sentences near 0. Needs no model.
* nll: the unsteered model's cross-entropy (nats per token) on the completion given
  its prompt. Fluent text the model could have written scores low; token soup high.
  It costs a forward pass, so it is taken on the first `nll_prompts` test prompts of
  each label (the same prompts in every cell); other rows have none.

The report flags a cell whose mean repetition or whose nll increase over the
baseline cell passes the thresholds in the experiment's `coherence` block.
"""

from __future__ import annotations

import math


def repetition(ids: list[int], n: int = 3) -> float:
    """Fraction of the n-grams of `ids` that repeat an earlier one (0.0 for fewer than n + 1 tokens)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def per_token(loss_and_count: tuple[float, int]) -> float:
    total, count = loss_and_count
    return total / count if count else math.nan
