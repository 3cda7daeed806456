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

from .interventions import Intervention, apply_nnsight
from .models import LoadedModel
from .select import kl_divergence, last_logits
from .templates import encode_prompt

CAPABILITY = pa.schema([
    ("model", pa.string()), ("source", pa.string()), ("intervention", pa.string()),
    ("coefficient", pa.float64()), ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int32()),
])


def load_pairs(path: str, limit: int) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    return [(r["instruction"], r["response"]) for r in rows[:limit]]


@torch.no_grad()
def completion_loss(lm: LoadedModel, pairs: list[tuple[str, str]], iv: Intervention, batch_size: int) -> float:
    """Mean cross-entropy per completion token, prompt tokens excluded, under `iv`."""
    sums = completion_losses(lm, pairs, iv, batch_size)
    count = sum(n for _, n in sums)
    return sum(s for s, _ in sums) / max(count, 1)


@torch.no_grad()
def completion_losses(lm: LoadedModel, pairs: list[tuple[str, str]], iv: Intervention,
                      batch_size: int) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) of each completion given its prompt, under `iv`."""
    import nnsight

    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for start in range(0, len(pairs), batch_size):
        rows, targets, where = [], [], []
        for j, (instruction, completion) in enumerate(pairs[start:start + batch_size]):
            prompt = encode_prompt(lm.tok, lm.spec, instruction)
            answer = lm.tok(completion, add_special_tokens=False)["input_ids"]
            if not answer:
                continue
            rows.append(prompt + answer)
            targets.append(len(answer))
            where.append(start + j)
        if not rows:
            continue
        width = max(len(r) for r in rows)
        pad = lm.tok.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # left padding puts every answer at the end: only the last `keep` positions need logits,
        # which matters when the vocabulary is large (the LM head dominates small models)
        keep = max(targets) + 1
        with lm.nn.trace(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                         position_ids=positions.to(lm.device), logits_to_keep=keep):
            holder = nnsight.save([])
            apply_nnsight(lm.nn, lm.rmap, iv)
            holder.append(lm.nn.output.logits)
        logits = holder[0].float().cpu()
        for i, n in enumerate(targets):
            # logits at t predict token t + 1: the answer's n tokens are predicted by positions -n-1 .. -2
            pred = logits[i, keep - n - 1:keep - 1]
            gold = ids[i, width - n:]
            out[where[i]] = (torch.nn.functional.cross_entropy(pred, gold, reduction="sum").item(), n)
    return out


def measure(lm: LoadedModel, iv: Intervention, reference: list[tuple[str, str]], own: list[tuple[str, str]],
            harmless: list[str], baseline_logits: torch.Tensor, batch_size: int) -> dict[str, tuple[float, int]]:
    own = [(p, c) for p, c in own if c.strip()]
    metrics = {
        "ce_reference": (completion_loss(lm, reference, iv, batch_size), len(reference)),
        "ce_own": (completion_loss(lm, own, iv, batch_size), len(own)),
    }
    steered = last_logits(lm, harmless, iv, batch_size)
    metrics["first_token_kl"] = (kl_divergence(baseline_logits, steered).mean().item(), len(harmless))
    return metrics


def to_table(model: str, source: str, intervention: str, coefficient: float | None,
             metrics: dict[str, tuple[float, int]]) -> pa.Table:
    names = sorted(metrics)
    return pa.table({
        "model": [model] * len(names), "source": [source] * len(names),
        "intervention": [intervention] * len(names), "coefficient": [coefficient] * len(names),
        "metric": names, "value": [metrics[k][0] for k in names], "n": [metrics[k][1] for k in names],
    }, schema=CAPABILITY)
