"""Stage 4: one grid cell of greedy generations, steered or ablated through nnsight.

A cell is (model, direction source, intervention). It runs on the harmful and the
harmless test prompts, batched, with the KV cache, on CUDA when present.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from . import capability
from .config import ModelSpec, resolve_data_path
from .errors import ConfigError
from .interventions import Intervention, apply_nnsight, check_direction
from .models import LoadedModel, stop_token_ids
from .orthogonalize import orthogonalize
from .select import last_logits
from .schemas import GENERATIONS, column_matrix, read_parquet, write_parquet
from .templates import encode_batch


def load_direction(selected_path: str, source: str) -> tuple[torch.Tensor, int, int, str]:
    """(direction, layer, position, direction_model) from a selected-directions file."""
    table = read_parquet(selected_path)
    want = "random" if source == "random" else "self"
    rows = [i for i, s in enumerate(table.column("source").to_pylist()) if s == want]
    if not rows:
        raise ValueError(f"{selected_path}: no '{want}' direction")
    i = rows[0]
    vec = torch.from_numpy(column_matrix(table, "direction")[i].copy())
    return (vec, table.column("layer")[i].as_py(), table.column("position")[i].as_py(),
            table.column("model")[i].as_py())


def hidden_size_of(prepared_dir: str) -> int | None:
    """Read the hidden size from the saved config, without loading weights."""
    cfg_path = Path(prepared_dir) / "config.json"
    if not cfg_path.exists():
        return None
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")


@torch.no_grad()
def generate(lm: LoadedModel, instructions: list[str], iv: Intervention, max_new_tokens: int,
             batch_size: int) -> list[str]:
    from transformers import GenerationConfig

    check_direction(iv, lm.rmap)
    stops = stop_token_ids(lm.hf, lm.tok)
    steer = iv.kind != "baseline"
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.tok.pad_token_id,
                               eos_token_id=sorted(stops) or None)
    out = []
    for start in tqdm(range(0, len(instructions), batch_size), desc=f"generate {iv.kind}", leave=False):
        batch = encode_batch(lm.tok, lm.spec, instructions[start:start + batch_size])
        kwargs = lm.inputs(batch)
        kwargs.pop("position_ids")  # generate derives positions from the attention mask
        with warnings.catch_warnings():
            # The open-ended step loop ends when generation stops, by design; nnsight warns about it.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with lm.nn.generate(generation_config=gen_cfg) as tracer:
                with tracer.invoke(**kwargs):
                    if steer:
                        # Every step, until the model stops on its own: pinning the length instead
                        # (min_new_tokens) would mask EOS and change what the model says.
                        for _ in tracer.iter[:]:
                            apply_nnsight(lm.nn, lm.rmap, iv)
                with tracer.invoke():  # after the loop, in its own invoke, so it always runs
                    ids = tracer.result.save()
        new_tokens = ids[:, batch.input_ids.shape[1]:].tolist()
        out.extend(decode_until_stop(lm.tok, row, stops) for row in new_tokens)
    return out


def decode_until_stop(tok, ids: list[int], stops: set[int]) -> str:
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    return tok.decode(ids, skip_special_tokens=True)


def run(spec: ModelSpec, prepared_dir: str, prompts_path: str, selected_path: str | None, output: str, *,
        source: str, intervention: str, coefficient: float | None, normalize: bool,
        max_new_tokens: int, batch_size: int, device: str, threads: int, exp_file: str,
        capability_out: str | None = None, capability_cfg: dict | None = None,
        baseline_path: str | None = None) -> None:
    direction, layer, position, direction_model = None, None, None, None
    if intervention != "baseline":
        direction, layer, position, direction_model = load_direction(selected_path, source)
        hidden = hidden_size_of(prepared_dir)
        if hidden is not None and hidden != direction.shape[0]:
            raise ConfigError(exp_file, "pairs", f"direction from {direction_model} has size {direction.shape[0]}, "
                              f"model {spec.name} has hidden size {hidden}")
    prompts = pl.from_arrow(read_parquet(prompts_path)).filter(pl.col("split") == "test")
    cap = dict(capability_cfg or {})
    measure_capability = capability_out is not None and cap.get("enabled", False)
    lm = LoadedModel(spec, prepared_dir, device, threads)
    if measure_capability:
        harmless = prompts.filter(pl.col("label") == "harmless")["instruction"].to_list()[:int(cap["n"])]
        # before any weight edit: the unsteered next-token distribution the KL is taken against
        baseline_logits = last_logits(lm, harmless, Intervention("baseline"), batch_size)
    if intervention == "orthogonalization":
        # The same ablation, baked into the weights: generate from the edited model with no hooks.
        try:
            orthogonalize(lm.hf, direction.to(lm.device))
        except ValueError as err:
            raise ConfigError(exp_file, "interventions", f"orthogonalization of {spec.name}: {err}") from None
        iv = Intervention("baseline")
    else:
        iv = Intervention(kind=intervention, direction=direction, layer=layer,
                          coefficient=float(coefficient or 0.0), normalize=normalize)
    completions = generate(lm, prompts["instruction"].to_list(), iv, max_new_tokens, batch_size)
    n = len(completions)
    table = pa.table({
        "model": [spec.name] * n, "template": [spec.template.name] * n, "source": [source] * n,
        "direction_model": [direction_model] * n, "layer": [layer] * n, "position": [position] * n,
        "intervention": [intervention] * n,
        "coefficient": [coefficient if intervention == "addition" else None] * n,
        "normalized": [normalize if intervention == "addition" else None] * n,
        "prompt_id": prompts["prompt_id"].to_list(), "label": prompts["label"].to_list(),
        "category": prompts["category"].to_list(), "prompt": prompts["instruction"].to_list(),
        "completion": completions,
    }, schema=GENERATIONS)
    if capability_out is not None:
        metrics = {}
        if measure_capability:
            own_source = table if intervention == "baseline" else read_parquet(baseline_path)
            own_df = pl.from_arrow(own_source).filter(pl.col("label") == "harmless").head(int(cap["n"]))
            own = list(zip(own_df["prompt"].to_list(), own_df["completion"].to_list()))
            reference = capability.load_pairs(str(resolve_data_path(cap["reference"])), int(cap["n"]))
            metrics = capability.measure(lm, iv, reference, own, harmless, baseline_logits, batch_size)
        write_parquet(capability.to_table(spec.name, source, intervention,
                                          coefficient if intervention == "addition" else None, metrics),
                      capability_out)
    write_parquet(table, output)
