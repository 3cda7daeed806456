"""Capability side effects of an intervention, measured in the generate job.

Three numbers per model x condition, all on harmless prompts:

* ce_reference: cross-entropy (nats per token) on reference answers to harmless
  instructions, counted on the answer tokens only (the direction paper's Alpaca loss);
* ce_own: the same on the model's own unsteered (baseline) completions;
* first_token_kl: KL(baseline || steered) of the next-token distribution at the last
  prompt position.

A steering that "works" by breaking the model shows up here as a jump in loss.
"""

from __future__ import annotations

import json

import pyarrow as pa
import torch

from .interventions import Edit
from .models import LoadedModel
from .schemas import CAPABILITY
from .probes import completion_loss, kl_divergence, last_logits



def load_pairs(path: str, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [(r["instruction"], r["response"]) for r in rows[:limit]]


def measure(lm: LoadedModel, iv: Edit, reference: list[tuple[str, str]], own: list[tuple[str, str]],
            harmless: list[str], baseline_logits: torch.Tensor, batch_size: int) -> dict[str, tuple[float, int]]:
    own = [(p, c) for p, c in own if c.strip()]
    metrics = {
        "ce_reference": (completion_loss(lm, reference, iv, batch_size), len(reference)),
        "ce_own": (completion_loss(lm, own, iv, batch_size), len(own)),
    }
    steered = last_logits(lm, harmless, iv, batch_size)
    metrics["first_token_kl"] = (kl_divergence(baseline_logits, steered).mean().item(), len(harmless))
    return metrics


def to_table(model: str, source: str, cell: str, intervention: str, coefficient: float | None,
             metrics: dict[str, tuple[float, int]]) -> pa.Table:
    names = sorted(metrics)
    return pa.table({
        "model": [model] * len(names), "source": [source] * len(names), "cell": [cell] * len(names),
        "intervention": [intervention] * len(names), "coefficient": [coefficient] * len(names),
        "metric": names, "value": [metrics[k][0] for k in names], "n": [metrics[k][1] for k in names],
    }, schema=CAPABILITY)
