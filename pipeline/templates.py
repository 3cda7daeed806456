"""Prompt formatting and tokenization with exact BOS handling.

Prompts are tokenized without the tokenizer's own special tokens; the BOS token is
prepended by us when the model YAML says `add_bos: true` and the template does not
already begin with it. That gives exactly one BOS, never two (the Llama-3 bug).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .specs import ModelSpec, TemplateSpec
from .errors import ConfigError
from .refusal import refusal_token_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq], left padded
    attention_mask: torch.Tensor
    n_post: int  # post-instruction tokens, the last n_post positions of every row


def post_instruction_ids(tokenizer, template: TemplateSpec) -> list[int]:
    return tokenizer(template.suffix, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, spec: ModelSpec, instruction: str) -> list[int]:
    ids = tokenizer(spec.template.format(instruction), add_special_tokens=False)["input_ids"]
    if spec.add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ConfigError(spec.file, "add_bos", "the tokenizer has no BOS token")
        if not ids or ids[0] != bos:
            ids = [bos] + ids
    return ids


def encode_batch(tokenizer, spec: ModelSpec, instructions: list[str]) -> Batch:
    """Tokenize and left-pad; check every prompt ends in the template's post-instruction tokens."""
    post = post_instruction_ids(tokenizer, spec.template)
    rows = [encode_prompt(tokenizer, spec, text) for text in instructions]
    for ids, text in zip(rows, instructions):
        if ids[-len(post):] != post:
            raise ConfigError(spec.file, "template",
                              f"the tokens after the instruction merge with it for {text[:40]!r}; "
                              "end the template's prefix/suffix on a token boundary")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return Batch(input_ids=input_ids, attention_mask=mask, n_post=len(post))


def check_inputs(tokenizer, spec: ModelSpec, prompts, context: int | None, max_new_tokens: int = 0) -> None:
    """Before the weights load: the refusal tokens resolve, the direction's position exists, every
    prompt (plus what will be generated) fits the model's context. `prompts`: rows with
    instruction, prompt_id and dataset (the prompts Parquet)."""
    if spec.refusal_tokens:
        refusal_token_ids(tokenizer, spec)
    n_post = len(post_instruction_ids(tokenizer, spec.template))
    if spec.direction_position < -n_post:
        raise ConfigError(spec.file, "direction.position", f"{spec.direction_position}: the template "
                          f"'{spec.template.name}' has {n_post} post-instruction tokens (-{n_post}..-1)")
    if not context:
        return
    for row in prompts.iter_rows(named=True):
        n = len(encode_prompt(tokenizer, spec, row["instruction"])) + max_new_tokens
        if n > context:
            raise ConfigError(f"conf/dataset/{row['dataset']}.yaml", "path",
                              f"prompt {row['prompt_id']!r} is {n} tokens with the template and generation, "
                              f"past {spec.name}'s context of {context}")
