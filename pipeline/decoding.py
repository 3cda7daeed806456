"""Greedy decoding under an intervention, batched, through nnsight: what the generate stage's cells and the
optimize stage's trials both run (no stage imports another stage, so the loop lives here)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from tqdm import tqdm

from .batching import halving
from .interventions import Edit
from .interventions.hooks import apply_nnsight, touches_activations
from .models import LoadedModel, stop_token_ids
from .templates import encode_batch


def generate(lm: LoadedModel, instructions: list[str], iv: Edit, max_new_tokens: int,
             batch_size: int, return_ids: bool = False,
             stop_at_eos: bool = True) -> list[str] | tuple[list[str], list[list[int]]]:
    """Greedy completions of `instructions` under one intervention (see `generate_many`)."""
    texts, ids = generate_many(lm, instructions, [iv], max_new_tokens, batch_size, stop_at_eos=stop_at_eos)[0]
    return (texts, ids) if return_ids else texts


@torch.no_grad()
def generate_many(lm: LoadedModel, instructions: list[str], ivs: list[Edit], max_new_tokens: int,
                  batch_size: int, stop_at_eos: bool = True) -> list[tuple[list[str], list[list[int]]]]:
    """Greedy completions of the same `instructions` under each of `ivs`, in one generation per batch.

    Each intervention is an nnsight invoke of its own over the same batch of prompts: nnsight
    stacks the invokes' rows into one forward pass per step and hands each invoke only its rows,
    so each edit touches only its cell. Every invoke's rows are the same tokens with the same
    padding as in a generation of their own, so a cell's completions do not depend on which cells
    share its pass (tests/test_generate_jobs.py). `batch_size` counts prompts per invoke: a pass
    holds len(ivs) x batch_size rows. Returns (texts, token ids) per intervention.

    `stop_at_eos=False` decodes exactly `max_new_tokens` tokens whatever they are, as the base-models
    post's code does (its greedy loop never stops at EOS; the text is decoded without special tokens).
    """
    from transformers import GenerationConfig

    for iv in ivs:
        iv.check(lm.rmap)
    stops = stop_token_ids(lm.hf, lm.tok) if stop_at_eos else set()
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tok.pad_token_id,
                               eos_token_id=sorted(stops) or None)
    what = ivs[0].kind if len(ivs) == 1 else f"{len(ivs)} cells"
    progress = tqdm(total=len(instructions), desc=f"generate {what}", leave=False)

    def run_chunk(start: int, stop: int) -> list[list[list[int]]]:
        """One generation over prompts start..stop: per intervention, the kept token ids per prompt."""
        batch = encode_batch(lm.tok, lm.spec, instructions[start:stop])
        kwargs = lm.inputs(batch)
        kwargs.pop("position_ids")  # generate derives positions from the attention mask
        with warnings.catch_warnings():
            # The open-ended step loop ends when generation stops, by design; nnsight warns about it.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with lm.nn.generate(generation_config=gen_cfg) as tracer:
                for iv in ivs:
                    with tracer.invoke(**kwargs):
                        if touches_activations(iv, lm.rmap):
                            # Every step, until the model stops on its own: pinning the length instead
                            # (min_new_tokens) would mask EOS and change what the model says.
                            for _ in tracer.iter[:]:
                                apply_nnsight(lm.nn, lm.rmap, iv)
                with tracer.invoke():  # after the loops, in its own invoke, so it always runs
                    ids = tracer.result.save()
        rows = stop - start
        generated = [until_stop(row, stops) for row in ids[:, batch.input_ids.shape[1]:].tolist()]
        progress.update(rows)
        return [generated[k * rows:(k + 1) * rows] for k in range(len(ivs))]  # invokes' rows in invoke order

    # on CUDA, a pass that does not fit is retried with half the prompts (halving)
    with _eos_from_model_config(lm.hf, keep=stop_at_eos):
        chunks = halving(len(instructions), batch_size, run_chunk)
    progress.close()
    out = []
    for k in range(len(ivs)):
        ids = [row for chunk in chunks for row in chunk[k]]
        out.append(([lm.tok.decode(row, skip_special_tokens=True) for row in ids], ids))
    return out


@contextlib.contextmanager
def _eos_from_model_config(hf, keep: bool):
    """transformers fills an unset eos_token_id from the model's own generation config, so decoding
    past EOS means clearing it there for the generation (and restoring it after)."""
    config = getattr(hf, "generation_config", None)
    if keep or config is None:
        yield
        return
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        yield
    finally:
        config.eos_token_id = saved


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def decode_until_stop(tok, ids: list[int], stops: set[int]) -> str:
    return tok.decode(until_stop(ids, stops), skip_special_tokens=True)
