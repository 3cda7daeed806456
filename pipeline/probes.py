"""Measurements every model stage shares: one forward pass under an intervention.

The last position's next-token logits (refusal scores, KL), the loss of a given
completion (capability and coherence), and the val prompts the cheap measurements
run on. Stages import these; no stage imports another stage.
"""

from __future__ import annotations

import polars as pl
import torch

from .batching import halving
from .interventions import Edit
from .interventions.hooks import apply_nnsight
from .models import LoadedModel
from .schemas import read_parquet
from .templates import encode_batch, encode_prompt


@torch.no_grad()
def last_logits(lm: LoadedModel, instructions: list[str], iv: Edit, batch_size: int) -> torch.Tensor:
    """Next-token logits at the last prompt position, [n, vocab], float32 on CPU."""
    import nnsight

    def chunk(start: int, stop: int) -> torch.Tensor:
        batch = encode_batch(lm.tok, lm.spec, instructions[start:stop])
        with lm.nn.trace(**lm.inputs(batch), logits_to_keep=1):
            holder = nnsight.save([])
            apply_nnsight(lm.nn, lm.rmap, iv)
            holder.append(lm.nn.output.logits[:, -1, :])
        return holder[0].float().cpu()

    return torch.cat(halving(len(instructions), batch_size, chunk))


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, in float64."""
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(other_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def val_prompts(prompts_path: str) -> tuple[list[str], list[str]]:
    df = pl.from_arrow(read_parquet(prompts_path)).filter(pl.col("split") == "val")
    harmful = df.filter(pl.col("label") == "harmful")["instruction"].to_list()
    harmless = df.filter(pl.col("label") == "harmless")["instruction"].to_list()
    return harmful, harmless


@torch.no_grad()
def completion_loss(lm: LoadedModel, pairs: list[tuple[str, str]], iv: Edit, batch_size: int) -> float:
    """Mean cross-entropy per completion token, prompt tokens excluded, under `iv`."""
    sums = completion_losses(lm, pairs, iv, batch_size)
    count = sum(n for _, n in sums)
    return sum(s for s, _ in sums) / max(count, 1)


@torch.no_grad()
def completion_losses(lm: LoadedModel, pairs: list[tuple[str, str]], iv: Edit,
                      batch_size: int) -> list[tuple[float, int]]:
    """(summed cross-entropy, token count) of each completion given its prompt, under `iv`."""

    def chunk(start: int, stop: int) -> list[tuple[int, tuple[float, int]]]:
        """(index in pairs, (summed loss, tokens)) of the chunk's non-empty completions."""
        rows, targets, where = [], [], []
        for j, (prompt, answer) in enumerate(encode_pairs(lm, pairs[start:stop])):
            if not answer:
                continue
            rows.append(prompt + answer)
            targets.append(len(answer))
            where.append(start + j)
        if not rows:
            return []
        keep = max(targets) + 1
        ids, logits = tail_logits(lm, rows, iv, keep)
        losses = []
        for i, n in enumerate(targets):
            # logits at t predict token t + 1: the answer's n tokens are predicted by positions -n-1 .. -2
            pred = logits[i, keep - n - 1:keep - 1]
            gold = ids[i, ids.shape[1] - n:]
            losses.append((where[i], (torch.nn.functional.cross_entropy(pred, gold, reduction="sum").item(), n)))
        return losses

    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for losses in halving(len(pairs), batch_size, chunk):
        for index, loss in losses:
            out[index] = loss
    return out


def encode_pairs(lm: LoadedModel, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids in the chat template, answer token ids) of each (instruction, answer)."""
    return [(encode_prompt(lm.tok, lm.spec, instruction), lm.tok(answer, add_special_tokens=False)["input_ids"])
            for instruction, answer in pairs]


def tail_logits(lm: LoadedModel, rows: list[list[int]], iv: Edit, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left-padded ids [rows, width], logits of the last `keep` positions [rows, keep, vocab], float32 on CPU).

    Left padding puts every row's end at the end: only the last `keep` positions need logits,
    which matters when the vocabulary is large (the LM head dominates small models)."""
    import nnsight

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), lm.tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with lm.nn.trace(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                     position_ids=positions.to(lm.device), logits_to_keep=keep):
        holder = nnsight.save([])
        apply_nnsight(lm.nn, lm.rmap, iv)
        holder.append(lm.nn.output.logits)
    return ids, holder[0].float().cpu()


@torch.no_grad()
def answer_logits(lm: LoadedModel, pairs: list[tuple[str, str]], iv: Edit, batch_size: int,
                  k: int) -> list[torch.Tensor]:
    """Teacher-forced next-token logits at the k positions that predict each answer's first k tokens
    (the last prompt position, then the answer's first k - 1 tokens), under `iv`: [m, vocab] per pair,
    float32 on CPU, m = 1 + min(k - 1, answer length) (an answer shorter than k gives fewer positions)."""

    def chunk(start: int, stop: int) -> list[torch.Tensor]:
        encoded = encode_pairs(lm, pairs[start:stop])
        rows = [prompt + answer[:k - 1] for prompt, answer in encoded]
        counts = [1 + min(k - 1, len(answer)) for _, answer in encoded]
        keep = max(counts)
        _, logits = tail_logits(lm, rows, iv, keep)
        return [logits[i, keep - m:] for i, m in enumerate(counts)]

    return [t for part in halving(len(pairs), batch_size, chunk) for t in part]


def mean_answer_kl(base: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """KL(base || other) per position, averaged over each answer's positions, then over answers."""
    per_answer = [kl_divergence(b, o).mean() for b, o in zip(base, other, strict=True)]
    return torch.stack(per_answer).mean().item() if per_answer else float("nan")
