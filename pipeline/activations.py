"""Stage 2: cache residual-stream activations at the post-instruction positions.

For every train prompt, the input of every decoder block (resid_pre) at each of
the template's post-instruction tokens is read through nnsight and stored, one
row per prompt x layer x position (schema in `schemas`).
"""

from __future__ import annotations

import nnsight
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from .architecture import get_path
from .batching import halving
from .specs import ModelSpec
from .models import LoadedModel, context_length, load_tokenizer
from .refusal import refusal_score, refusal_token_ids
from .schemas import activations_schema, read_parquet, vectors_column, write_parquet
from .inputs import check_inputs
from .templates import encode_batch


@torch.no_grad()
def capture(lm: LoadedModel, instructions: list[str], batch_size: int, with_scores: bool = False):
    """Activations as float32 [prompt, layer, position, hidden] (positions -n_post..-1).

    With `with_scores`, also each prompt's logit refusal score from the same forward pass.
    """
    token_ids = refusal_token_ids(lm.tok, lm.spec) if with_scores else None
    progress = tqdm(total=len(instructions), desc=f"activations {lm.spec.name}", leave=False)

    def chunk(start: int, stop: int) -> tuple[np.ndarray, torch.Tensor | None]:
        batch = encode_batch(lm.tok, lm.spec, instructions[start:stop])
        n = batch.n_post
        with lm.nn.trace(**lm.inputs(batch), logits_to_keep=1):
            saved = nnsight.save([])  # a plain list would not outlive the trace
            for block in get_path(lm.nn, lm.rmap.layers):
                saved.append(block.input[:, -n:, :])
            if with_scores:
                saved.append(lm.nn.output.logits[:, -1, :])
        score = refusal_score(saved.pop().float().cpu(), token_ids) if with_scores else None
        progress.update(stop - start)
        return torch.stack([s.float().cpu() for s in saved], dim=1).numpy(), score

    with progress:
        chunks = halving(len(instructions), batch_size, chunk)
    acts = np.concatenate([a for a, _ in chunks], axis=0)
    return (acts, torch.cat([s for _, s in chunks]).numpy()) if with_scores else acts


def to_table(spec: ModelSpec, prompts: pl.DataFrame, acts: np.ndarray, dtype: str,
             scores: np.ndarray | None = None) -> pa.Table:
    n_prompts, n_layers, n_post, hidden = acts.shape
    layer = np.tile(np.repeat(np.arange(n_layers), n_post), n_prompts)
    position = np.tile(np.arange(-n_post, 0), n_prompts * n_layers)
    per_row = n_layers * n_post
    schema = activations_schema(hidden, dtype)
    value_type = schema.field("act").type.value_type
    np_dtype = np.float16 if dtype == "float16" else np.float32
    if scores is None:
        scores = np.full(n_prompts, np.nan)
    return pa.table({
        "model": [spec.name] * len(layer),
        "template": [spec.template.name] * len(layer),
        "prompt_id": np.repeat(prompts["prompt_id"].to_numpy(), per_row),
        "label": np.repeat(prompts["label"].to_numpy(), per_row),
        "layer": layer.astype(np.int16),
        "position": position.astype(np.int16),
        "refusal_score": np.repeat(np.asarray(scores, dtype=np.float32), per_row),
        "act": vectors_column(acts.reshape(-1, hidden).astype(np_dtype), value_type),
    }, schema=schema)


def run(spec: ModelSpec, prepared_dir: str, prompts_path: str, output: str, *, batch_size: int,
        dtype: str, device: str, threads: int, split: str = "train") -> None:
    every = pl.from_arrow(read_parquet(prompts_path))
    # the first model job: check every split's prompts against the tokenizer before the weights load
    tok = load_tokenizer(spec, prepared_dir)
    check_inputs(tok, spec, every, context_length(spec, prepared_dir))
    prompts = every.filter(pl.col("split") == split)
    lm = LoadedModel(spec, prepared_dir, device, threads, tokenizer=tok)
    if spec.refusal_tokens:
        acts, scores = capture(lm, prompts["instruction"].to_list(), batch_size, with_scores=True)
    else:
        acts, scores = capture(lm, prompts["instruction"].to_list(), batch_size), None
    # refusal_score is NaN on purpose only when the model has no refusal tokens to score
    write_parquet(to_table(spec, prompts, acts, dtype, scores), output, vector_columns=("act",),
                  nan_ok=("refusal_score",) if scores is None else ())
