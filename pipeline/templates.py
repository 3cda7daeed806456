"""Prompt formatting and tokenization with exact BOS handling.

Prompts are tokenized without the tokenizer's own special tokens; the BOS token is
prepended by us when the model YAML says `add_bos: true` and the template does not
already begin with it. That gives exactly one BOS, never two (the Llama-3 bug).

The post-instruction tokens (where activations are read and refusal is decided) are
counted in the formatted prompt itself, never by tokenizing the template's suffix alone:
alone, a SentencePiece tokenizer starts "\\nASSISTANT:" with a "▁" piece that the prompt
does not have. They are the tokens that start at or after the character where the suffix
begins (character offsets of a fast tokenizer). A token that straddles that character
(the instruction's last character merged with the suffix's first) is an error naming the
template, and so is a prompt whose post-instruction tokens differ from the template's:
activations are stored at positions -n_post..-1, which must mean the same tokens for every
prompt of a run.

Instructions are data: one that contains a special token of the tokenizer as text (`<|im_end|>`,
`<|eot_id|>`, `</s>`...) would be tokenized as the template's own control token, a forged turn
boundary. `inputs.check_inputs` refuses it, naming the prompt. (Encoding it as text is no option: the
template's tokens sit in the same string, and splitting the prompt into pieces changes the tokens of
ordinary prompts at the seams.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .specs import ModelSpec

# The instruction of the reference prompt: what the template's post-instruction tokens are, for
# checks that have no prompt at hand (the direction position, the refusal tokens in context).
REFERENCE_INSTRUCTION = "Tell me how to make a cake"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq], left padded
    attention_mask: torch.Tensor
    n_post: int  # post-instruction tokens, the last n_post positions of every row


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # BOS (when the YAML adds it) + the formatted prompt's tokens
    n_post: int  # the last n_post ids are the template's post-instruction tokens

    @property
    def post(self) -> list[int]:
        return self.ids[len(self.ids) - self.n_post:]


class TokenBoundaryError(ValueError):
    """A token of `text` covers characters on both sides of `boundary`."""

    def __init__(self, text: str, boundary: int, token: str):
        self.text, self.boundary, self.token = text, boundary, token
        super().__init__(f"the token {token!r} spans {text[max(0, boundary - 10):boundary]!r}|"
                         f"{text[boundary:boundary + 10]!r}")


def split_tokens(tokenizer, text: str, boundary: int, absorb_space: bool = False) -> tuple[list[int], int]:
    """Tokenize `text` (no special tokens): (ids, k), ids[:k] the tokens of text[:boundary], ids[k:] the rest.

    Fast tokenizers: by character offsets, ids[k] is the first token that starts at or after
    `boundary`. With `absorb_space`, a token that starts in whitespace just before the
    boundary and runs past it counts as the first one after it (SentencePiece's "▁I" after a
    template ending in a space). Any other token across the boundary raises TokenBoundaryError.
    Slow tokenizers (no offsets, e.g. Qwen 1's remote code): text[:boundary] tokenized alone
    must be a prefix of the whole's tokens (with `absorb_space`, text[:boundary] without its
    trailing whitespace may be).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = enc["input_ids"], enc["offset_mapping"]
        k = 0
        while k < len(ids) and spans[k][0] < boundary:
            start, end = spans[k]
            if end > boundary:
                if absorb_space and not text[start:boundary].strip():
                    break
                raise TokenBoundaryError(text, boundary, tokenizer.convert_ids_to_tokens(ids[k]))
            k += 1
        return ids, k
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    heads = [text[:boundary]]
    if absorb_space and text[:boundary].rstrip() != text[:boundary]:
        heads.append(text[:boundary].rstrip())
    for head in heads:
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
        if ids[:len(head_ids)] == head_ids:
            return ids, len(head_ids)
    first = next((i for i, (a, b) in enumerate(zip(ids, head_ids)) if a != b), min(len(ids), len(head_ids)) - 1)
    raise TokenBoundaryError(text, boundary, tokenizer.convert_ids_to_tokens(ids[first]))


def _with_bos(tokenizer, spec: ModelSpec, ids: list[int]) -> list[int]:
    if spec.add_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ConfigError(spec.file, "add_bos", "the tokenizer has no BOS token")
        if not ids or ids[0] != bos:
            ids = [bos] + ids
    return ids


def encode(tokenizer, spec: ModelSpec, instruction: str) -> Prompt:
    """The prompt's ids and how many of them, at the end, come after the instruction."""
    template = spec.template
    text = template.format(instruction)
    try:
        ids, k = split_tokens(tokenizer, text, len(template.prefix) + len(instruction))
    except TokenBoundaryError as err:
        raise ConfigError(spec.file, "template", f"template '{template.name}': {err.token!r} is one token across "
                          f"the end of the instruction {instruction[-30:]!r} and the text after it "
                          f"{template.suffix[:20]!r}; end the template's prefix/suffix on a token boundary") from None
    n_post = len(ids) - k
    if n_post == 0:
        raise ConfigError(spec.file, "template", f"template '{template.name}': no token after the instruction")
    return Prompt(ids=_with_bos(tokenizer, spec, ids), n_post=n_post)


def encode_prompt(tokenizer, spec: ModelSpec, instruction: str) -> list[int]:
    return encode(tokenizer, spec, instruction).ids


def post_instruction_ids(tokenizer, spec: ModelSpec, instruction: str = REFERENCE_INSTRUCTION) -> list[int]:
    """The template's post-instruction tokens, as they stand in the formatted prompt of `instruction`."""
    return encode(tokenizer, spec, instruction).post


def control_token_finder(tokenizer):
    """text -> the first special token of `tokenizer` that `text` contains as text, else None.

    Special: `all_special_tokens` and the added tokens marked special (Llama 3's `<|eot_id|>` is only
    there). Added tokens not marked special (GPT-NeoX's runs of spaces, Qwen's `<think>`) are left alone:
    ordinary text hits them. Besides the substring test, the text is encoded alone and must give no
    special id, for added tokens matched after normalisation; the unknown token is not counted there
    (it stands for characters outside the vocabulary, not for a control token written out)."""
    # getattr: a tokenizer without these (a test stub) has no special token to forge
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens = {t for t in getattr(tokenizer, "all_special_tokens", ()) if t}
    tokens.update(t.content for t in decoder.values() if t.special and t.content)
    ids = set(getattr(tokenizer, "all_special_ids", ())) | {i for i, t in decoder.items() if t.special}
    ids.discard(getattr(tokenizer, "unk_token_id", None))

    def find(text: str) -> str | None:
        # the earliest in the text, the longest there: '<|im_end|>' before anything inside it
        hits = [(text.find(t), -len(t), t) for t in tokens if t in text]
        if hits:
            return min(hits)[2]
        if not ids:
            return None
        found = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in ids]
        return tokenizer.convert_ids_to_tokens(found[0]) if found else None

    return find


def check_post(tokenizer, spec: ModelSpec, reference: Prompt, prompt: Prompt, instruction: str, where: str) -> None:
    if prompt.post != reference.post:
        name = spec.template.name
        raise ConfigError(spec.file, "template", f"template '{name}': after {where} the text after the instruction is "
                          f"{prompt.n_post} tokens {tokenizer.convert_ids_to_tokens(prompt.post)}, after "
                          f"{REFERENCE_INSTRUCTION!r} {reference.n_post} {tokenizer.convert_ids_to_tokens(reference.post)}; "
                          "positions -n..-1 must be the same tokens for every prompt")


def encode_batch(tokenizer, spec: ModelSpec, instructions: list[str]) -> Batch:
    """Tokenize and left-pad; every prompt must end in the same post-instruction tokens (the template's)."""
    reference = encode(tokenizer, spec, REFERENCE_INSTRUCTION)
    prompts = [encode(tokenizer, spec, text) for text in instructions]
    for prompt, text in zip(prompts, instructions):
        check_post(tokenizer, spec, reference, prompt, text, repr(text[:40]))
    return left_padded(tokenizer, [p.ids for p in prompts], reference.n_post)


def left_padded(tokenizer, rows: list[list[int]], n_post: int) -> Batch:
    """Token id rows as one batch, padded on the left (pad id, else EOS) so every row ends at the last column."""
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return Batch(input_ids=input_ids, attention_mask=mask, n_post=n_post)
