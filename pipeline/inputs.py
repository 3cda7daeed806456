"""What a model job checks on its prompts before the weights load (one ConfigError line each).

Apart from `templates` (encoding) and `refusal` (refusal tokens), which it builds on.
"""

from __future__ import annotations

from .errors import ConfigError
from .refusal import refusal_token_ids
from .specs import ModelSpec
from .templates import REFERENCE_INSTRUCTION, check_post, control_token_finder, encode


def check_inputs(tokenizer, spec: ModelSpec, prompts, context: int | None, max_new_tokens: int = 0) -> None:
    """Before the weights load: the refusal tokens resolve, the direction's position exists, no prompt
    writes a special token as text, every prompt ends in the template's post-instruction tokens and
    (plus what will be generated) fits the model's context. `prompts`: rows with instruction, prompt_id
    and dataset (the prompts Parquet)."""
    if spec.refusal_tokens:
        refusal_token_ids(tokenizer, spec)
    reference = encode(tokenizer, spec, REFERENCE_INSTRUCTION)
    n_post = reference.n_post
    if spec.direction.position < -n_post:
        raise ConfigError(spec.file, "direction.position", f"{spec.direction.position}: the template "
                          f"'{spec.template.name}' has {n_post} post-instruction tokens (-{n_post}..-1)")
    control_token = control_token_finder(tokenizer)
    for row in prompts.iter_rows(named=True):
        token = control_token(row["instruction"])
        if token is not None:
            raise ConfigError(f"conf/dataset/{row['dataset']}.yaml", "path",
                              f"prompt {row['prompt_id']!r} contains {token!r}, a special token of {spec.name}'s "
                              "tokenizer: it would be read as the template's control token, not as text; "
                              "remove the prompt from the prompt set")
        prompt = encode(tokenizer, spec, row["instruction"])
        check_post(tokenizer, spec, reference, prompt, row["instruction"],
                    f"prompt {row['prompt_id']!r} of conf/dataset/{row['dataset']}.yaml")
        n = len(prompt.ids) + max_new_tokens
        if context and n > context:
            raise ConfigError(f"conf/dataset/{row['dataset']}.yaml", "path",
                              f"prompt {row['prompt_id']!r} is {n} tokens with the template and generation, "
                              f"past {spec.name}'s context of {context}")
