"""Degeneration of a completion: is it real text (an answer or a refusal), or broken output?

Per completion, written beside it by the generate job:

* repetition: the fraction of token n-grams (n = 3) that already occurred earlier in
  the same completion. Loops ("Title: Title: Title:", "🌟 🌟 🌟") score near 1; ordinary
  sentences near 0. Needs no model.
* nll_neutral: the unsteered model's cross-entropy (nats per token) on the completion
  after a neutral instruction (NEUTRAL_INSTRUCTION in the model's template), not after its
  own prompt: a fluent refusal of a harmless request is unexpected given that request but
  ordinary text, and only its fluency should count. Token soup scores high.
* nll: the same loss given the completion's own prompt. Alone, and compared with the baseline
  cell's, it measured departure from unsteered behaviour, which every successful steering is.

The losses cost a forward pass, so they are taken on the first `nll_prompts` test prompts of
each label (the same prompts in every cell); other rows have none.

A completion is broken when its repetition, or the lower of its two losses (`fluency_loss`:
fluent text reads well after its own prompt or after the neutral one), passes the thresholds of
the experiment's `coherence` block (`broken`); a cell is degenerate when more than
`broken_share_max` of its measured completions are (`degenerate_cells`, called by the report).
Thresholds and the choice of measure: docs/measures.md (scripts/evaluate_coherence.py on the
labelled set pipeline/data/labelled_completions.jsonl).
"""

from __future__ import annotations

import math

# The instruction the completion is scored after: a request any reply fits.
NEUTRAL_INSTRUCTION = "Write a short reply."


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


def neutral_nll(lm, completions: list[str], batch_size: int, measured: list[bool] | None = None) -> list[float | None]:
    """Per-token loss of the unsteered model on each completion after NEUTRAL_INSTRUCTION (None where
    not measured; NaN for an empty completion)."""
    from .interventions import Edit
    from .probes import completion_losses

    measured = measured if measured is not None else [True] * len(completions)
    pairs = [(NEUTRAL_INSTRUCTION, c) for c, m in zip(completions, measured) if m]
    sums = iter(completion_losses(lm, pairs, Edit(), batch_size))
    return [per_token(next(sums)) if m else None for m in measured]


def _known(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def fluency_loss(nll: float | None, nll_neutral: float | None) -> float | None:
    """The lower of the two losses: text is fluent if it reads well after its own prompt (an answer)
    or after a neutral instruction (a refusal, or anything a steered model may say instead). None
    when neither was measured."""
    known = [x for x in (nll, nll_neutral) if _known(x)]
    return min(known) if known else None


def broken_score(loss: float | None, rep: float, nll_max: float, repetition_max: float) -> float:
    """How far past the nearer threshold a completion is: > 1 means broken (`broken`). `loss`: its
    fluency_loss; a completion without one (not measured, or empty) is judged on repetition alone."""
    score = rep / repetition_max
    return max(score, loss / nll_max) if _known(loss) else score


def broken(loss: float | None, rep: float, nll_max: float, repetition_max: float) -> bool:
    return broken_score(loss, rep, nll_max, repetition_max) > 1.0


def broken_share(losses: list[float | None], reps: list[float], nll_max: float, repetition_max: float) -> float:
    """Share of broken completions among those with a loss (all of them when none has one)."""
    rows = [(n, r) for n, r in zip(losses, reps) if _known(n)] or [(None, r) for r in reps]
    if not rows:
        return math.nan
    return sum(broken(n, r, nll_max, repetition_max) for n, r in rows) / len(rows)


def degenerate_cell(losses: list[float | None], reps: list[float], *, nll_max: float, repetition_max: float,
                    broken_share_max: float) -> bool:
    """The cell-level flag: more than `broken_share_max` of the cell's completions are broken."""
    share = broken_share(losses, reps, nll_max, repetition_max)
    return not math.isnan(share) and share > broken_share_max


def degenerate_cells(scores, keys: list[str], cfg: dict | None = None):
    """Per group of `keys` (the report's cell x label): broken_share and degenerate, from the rows'
    nll, nll_neutral and repetition and the `coherence` block `cfg` (its defaults when None). Rows
    written before nll_neutral existed use nll alone."""
    import polars as pl

    from .config import Coherence

    c = Coherence(**(cfg or {}))
    rows = []
    for key, grp in scores.group_by(keys, maintain_order=True):
        nll = grp["nll"].to_list() if "nll" in grp.columns else [None] * grp.height
        neutral = grp["nll_neutral"].to_list() if "nll_neutral" in grp.columns else [None] * grp.height
        losses, reps = [fluency_loss(a, b) for a, b in zip(nll, neutral)], grp["repetition"].to_list()
        rows.append({**dict(zip(keys, key)),
                     "broken_share": broken_share(losses, reps, c.nll_max, c.repetition_max),
                     "degenerate": degenerate_cell(losses, reps, nll_max=c.nll_max, repetition_max=c.repetition_max,
                                                   broken_share_max=c.broken_share_max)})
    return pl.DataFrame(rows, schema={**{k: scores.schema[k] for k in keys}, "broken_share": pl.Float64,
                                      "degenerate": pl.Boolean})
