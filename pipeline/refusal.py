"""The logit refusal score: how strongly the next token starts a refusal.

At the last prompt position, P = the summed probability of the model family's
refusal tokens (e.g. "I" and "As" for Qwen); score = log(P + eps) - log(1 - P + eps).
It needs one forward pass, no generation, which makes it the cheap proxy used for
direction selection and sweeps.

The refusal tokens are the YAML phrases as the model emits them right after its template
(resolved in context, `refusal_token_ids`), not the phrase tokenized alone.
"""

from __future__ import annotations

import torch

from .specs import ModelSpec
from .errors import ConfigError
from .templates import REFERENCE_INSTRUCTION, TokenBoundaryError, split_tokens

EPS = 1e-8


def phrase_context(spec: ModelSpec, phrase: str) -> tuple[str, int]:
    """(text, start): the reference prompt followed by the phrase as the model would write it, and
    where the phrase's part begins. After a template that ends in a visible character ("ASSISTANT:")
    the model writes a space before a phrase that starts with one ("ASSISTANT: I"), so the phrase
    gets one; a phrase that begins with whitespace, or a template that ends in it, is joined as is."""
    prompt = spec.template.format(REFERENCE_INSTRUCTION)
    joint = " " if prompt[-1:].strip() and phrase[:1].strip() else ""
    return prompt + joint + phrase, len(prompt)


def refusal_token_ids(tok, spec: ModelSpec) -> list[int]:
    """Resolve the YAML refusal tokens to ids, as the model emits them after its template.

    Each phrase is tokenized in context, after the formatted prompt of a reference instruction
    (`phrase_context`), and must be exactly one token there: the token that starts where the
    phrase does (by character offsets; it may also take the template's trailing whitespace, as
    SentencePiece's "▁I" does after "[/INST] "). So "I" is "▁I" / " I" after "ASSISTANT:" and
    the no-space "I" after a newline, whatever the tokenizer makes of "I" alone.
    """
    if not spec.refusal_tokens:
        raise ConfigError(spec.file, "refusal_tokens", "lists no token")
    where = f"after the template '{spec.template.name}'"
    ids = []
    for i, phrase in enumerate(spec.refusal_tokens):
        text, start = phrase_context(spec, phrase)
        try:
            found, k = split_tokens(tok, text, start, absorb_space=True)
        except TokenBoundaryError as err:
            raise ConfigError(spec.file, f"refusal_tokens[{i}]", f"{phrase!r} {where}: its first token {err.token!r} "
                              "also takes the end of the template, no clean token boundary") from None
        found = found[k:]
        if len(found) != 1:
            raise ConfigError(spec.file, f"refusal_tokens[{i}]",
                              f"{phrase!r} is {len(found)} tokens {where} for this tokenizer, not one")
        ids.append(found[0])
    return ids


def refusal_score(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Scores from last-position logits [batch, vocab] (computed in float64)."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, token_ids].sum(-1)
    return torch.log(p + EPS) - torch.log(1 - p + EPS)
