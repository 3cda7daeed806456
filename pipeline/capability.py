"""Capability side effects of an intervention, measured in the generate job.

Four numbers per model x condition, all on harmless prompts:

* ce_reference: cross-entropy (nats per token) on reference answers to harmless
  instructions, counted on the answer tokens only (the direction paper's Alpaca loss);
* ce_own: the same on the model's own unsteered (baseline) completions;
* first_token_kl: KL(baseline || steered) of the next-token distribution at the last
  prompt position;
* kl_tokens: KL(baseline || steered) over the first k answer positions (`capability.kl_tokens`),
  teacher-forced on the baseline's own greedy answer: the last prompt position, then the answer's
  first k - 1 tokens; averaged over each answer's positions, then over prompts (k = 1: first_token_kl).
  A steering can leave the first token alone and still derail the answer after it.

A steering that "works" by breaking the model shows up here as a jump in loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import torch

from .interventions import Edit
from .models import LoadedModel
from .schemas import CAPABILITY
from .probes import answer_logits, completion_loss, kl_divergence, last_logits, mean_answer_kl


@dataclass(frozen=True)
class BaselineAnswers:
    """The unsteered model's own answers and its logits over their first k positions, computed once per
    job (the same for every cell) and before any weight edit."""

    pairs: list[tuple[str, str]]
    logits: list[torch.Tensor]
    k: int


def baseline_answers(lm: LoadedModel, own: list[tuple[str, str]], k: int, batch_size: int) -> BaselineAnswers:
    """`own`: the baseline's answers to the harmless prompts, empty ones kept (they still have a first token)."""
    return BaselineAnswers(own, answer_logits(lm, own, Edit(), batch_size, k), k)


def load_pairs(path: str, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [(r["instruction"], r["response"]) for r in rows[:limit]]


def measure(lm: LoadedModel, iv: Edit, reference: list[tuple[str, str]], own: list[tuple[str, str]],
            harmless: list[str], baseline_logits: torch.Tensor, batch_size: int,
            answers: BaselineAnswers | None = None) -> dict[str, tuple[float, int]]:
    """The capability metrics of `iv`; kl_tokens only with the baseline's `answers`."""
    own = [(p, c) for p, c in own if c.strip()]
    metrics = {
        "ce_reference": (completion_loss(lm, reference, iv, batch_size), len(reference)),
        "ce_own": (completion_loss(lm, own, iv, batch_size), len(own)),
    }
    steered = last_logits(lm, harmless, iv, batch_size)
    metrics["first_token_kl"] = (kl_divergence(baseline_logits, steered).mean().item(), len(harmless))
    if answers is not None:
        steered_answers = answer_logits(lm, answers.pairs, iv, batch_size, answers.k)
        metrics["kl_tokens"] = (mean_answer_kl(answers.logits, steered_answers), len(answers.pairs))
    return metrics


def to_table(model: str, source: str, cell: str, intervention: str, coefficient: float | None,
             metrics: dict[str, tuple[float, int]]) -> pa.Table:
    names = sorted(metrics)
    return pa.table({
        "model": [model] * len(names), "source": [source] * len(names), "cell": [cell] * len(names),
        "intervention": [intervention] * len(names), "coefficient": [coefficient] * len(names),
        "metric": names, "value": [metrics[k][0] for k in names], "n": [metrics[k][1] for k in names],
    }, schema=CAPABILITY)
