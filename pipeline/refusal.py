"""The logit refusal score: how strongly the next token starts a refusal.

At the last prompt position, P = the summed probability of the model family's
refusal tokens (e.g. "I" and "As" for Qwen); score = log(P + eps) - log(1 - P + eps).
It needs one forward pass, no generation, which makes it the cheap proxy used for
direction selection and sweeps.
"""

from __future__ import annotations

import torch

from .specs import ModelSpec
from .errors import ConfigError

EPS = 1e-8


def refusal_token_ids(tok, spec: ModelSpec) -> list[int]:
    """Resolve the YAML refusal tokens to ids; each must be exactly one token."""
    if not spec.refusal_tokens:
        raise ConfigError(spec.file, "refusal_tokens", "lists no token")
    ids = []
    for i, text in enumerate(spec.refusal_tokens):
        found = tok(text, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            raise ConfigError(spec.file, f"refusal_tokens[{i}]",
                              f"{text!r} is {len(found)} tokens for this tokenizer, not one")
        ids.append(found[0])
    return ids


def refusal_score(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Scores from last-position logits [batch, vocab] (computed in float64)."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, token_ids].sum(-1)
    return torch.log(p + EPS) - torch.log(1 - p + EPS)
