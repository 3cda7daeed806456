"""Parquet schemas of every stage's output, and atomic reading and writing.

Schemas (one row per ...):

prompts.parquet            prompt: prompt_id, label (harmful|harmless), split
                           (train|val|test), category, dataset, instruction; schema
                           metadata `pools`: per set, loaded, sampled, kept and the
                           rows dropped by reason (pipeline/prompts.py)
activations/{model}        prompt x layer x post-instruction position: model,
                           template, prompt_id, label, layer, position (negative
                           offset from the end: -n_post .. -1), refusal_score
                           (the prompt's logit refusal score, unsteered), act =
                           FixedSizeList<float16|float32>[hidden], the residual
                           stream at the block input (resid_pre)
directions/{m}/candidates  layer x position: model, method (direction.method),
                           n_harmful, n_harmless, layer, position, norm, direction =
                           FixedSizeList<float32>, the method's direction in float64
                           (mean_diff: the raw mean(harmful) - mean(harmless))
directions/{m}/selection   candidate: model, layer, position, norm, bypass, induce,
                           kl, discarded (why, or null), chosen
directions/{m}/selected    direction source (self, random): model, source, method
                           (the candidates'; null for random), layer, position,
                           norm, direction
directions/{m}/other_methods  direction.other_methods entry, at the selected layer and
                           position: as selected, source self-<method>
generations/...            test prompt: model, template, source (none|self|random|
                           self-<method>|<partner model>|sweep|rule|optimize), cell (the file name: baseline,
                           addition_2, best1, ...), direction_model, extraction_layer,
                           extraction_position (where the direction was taken),
                           intervention (baseline|ablation|orthogonalization|addition),
                           addition_layer (the block whose input was steered),
                           coefficient, normalized, ablation_layers ("all" or
                           "a-b"), prompt_id, label, category, prompt, completion,
                           repetition, nll and nll_neutral (degeneration, see
                           `coherence`)
sweep/{m}/sweep            swept cell: model, kind (baseline|addition|ablation),
                           extraction_layer, extraction_position, addition_layer,
                           offset, coefficient, normalized, label, logit_score
                           (mean logit refusal score on the val prompts), n
sweep/{m}/picks            a cell chosen for generation: pick (best1, same1, ...),
                           the sweep row's axes and its logit_score
optimize/{m}/trials        trial of the optimize study: model, method, number, state
                           (COMPLETE, RUNNING, FAIL, ...), one column per searched
                           setting (dotted name), refusals (harmful val prompts
                           refused), n, kl (mean first-token KL on harmless val
                           prompts), duration (s); pareto: the front's trials
scores/...                 the generation row plus scorer and refused (bool): one row per
                           completion per scorer of the experiment (`scoring:` may list several)
capability/...             metric: model, source, cell, intervention, coefficient, metric
                           (ce_reference | ce_own | first_token_kl | kl_tokens), value, n
                           (schema in `capability`)
length/length              cell x label x scorer x k (experiments with `length:`): the
                           cell's model, source, cell, intervention, extraction_layer,
                           addition_layer, coefficient; label, scorer, tokens (k), n,
                           refused, ended (completions that stopped before k tokens),
                           refusal_rate, ci_low, ci_high (95% Wilson)
stability/stability        model x bootstrap draw x layer x position (`direction.bootstrap`):
                           model, draw, layer, position, n_harmful, n_harmless (distinct
                           train prompts drawn), norm, cosine (to the full-data direction at
                           the same layer and position), selected (the full data's pick),
                           and with reselection: bypass, induce, kl, discarded, picked
summary (.parquet, .csv)   model x cell x scorer x label: the generation axes, scorer, condition
                           (readable name), picked_on ("val" for sweep cells chosen by their
                           val logit score, else null), n, refused, refusal_rate, ci_low and
                           ci_high (95% Wilson interval), p_value (exact McNemar vs the
                           model's baseline by the same scorer, paired on prompt_id; null for the baseline and
                           for cells on other prompts), repetition, nll, nll_increase,
                           degenerate, then one column per capability metric of the cell
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Stages import the atomic readers and writers from here.
from .atomic import read_parquet, write_bytes, write_parquet, write_text  # noqa: F401

PROMPTS = pa.schema([
    ("prompt_id", pa.string()), ("label", pa.string()), ("split", pa.string()),
    ("category", pa.string()), ("dataset", pa.string()), ("instruction", pa.string()),
])


def activations_schema(hidden: int, dtype: str) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        ("model", pa.string()), ("template", pa.string()), ("prompt_id", pa.string()),
        ("label", pa.string()), ("layer", pa.int16()), ("position", pa.int16()),
        ("refusal_score", pa.float32()), ("act", pa.list_(value, hidden)),
    ])


def direction_schema(hidden: int, extra: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([("model", pa.string()), *extra, ("layer", pa.int16()), ("position", pa.int16()),
                      ("norm", pa.float64()), ("direction", pa.list_(pa.float32(), hidden))])


# `method`: the direction method that made the row (pipeline/direction_methods.py); null for the random control
CANDIDATE_EXTRA = [("method", pa.string()), ("n_harmful", pa.int32()), ("n_harmless", pa.int32())]
SELECTED_EXTRA = [("source", pa.string()), ("method", pa.string())]


def selected_directions(model: str, layer: int, position: int,
                        rows: list[tuple[str, str | None, np.ndarray]]) -> pa.Table:
    """Directions taken at one layer and position, one row per (source, method or None, vector): the selected
    file's rows (self and its random control) and the other direction methods' (self-<method>)."""
    matrix = np.stack([v for *_, v in rows]).astype(np.float32)
    return pa.table({
        "model": [model] * len(rows), "source": [s for s, *_ in rows], "method": [m for _, m, _ in rows],
        "layer": [layer] * len(rows), "position": [position] * len(rows),
        "norm": [float(np.linalg.norm(v)) for *_, v in rows],
        "direction": vectors_column(matrix, pa.float32()),
    }, schema=direction_schema(matrix.shape[1], SELECTED_EXTRA))

GENERATIONS = pa.schema([
    ("model", pa.string()), ("template", pa.string()), ("source", pa.string()), ("cell", pa.string()),
    ("direction_model", pa.string()), ("extraction_layer", pa.int16()), ("extraction_position", pa.int16()),
    ("intervention", pa.string()), ("addition_layer", pa.int16()), ("coefficient", pa.float64()),
    ("normalized", pa.bool_()), ("ablation_layers", pa.string()),
    ("prompt_id", pa.string()), ("label", pa.string()), ("category", pa.string()),
    ("prompt", pa.string()), ("completion", pa.string()),
    ("repetition", pa.float64()), ("nll", pa.float64()), ("nll_neutral", pa.float64()),
])

SCORES = GENERATIONS.append(pa.field("scorer", pa.string())).append(pa.field("refused", pa.bool_()))

SELECTION = pa.schema([
    ("model", pa.string()), ("layer", pa.int16()), ("position", pa.int16()), ("norm", pa.float64()),
    ("bypass", pa.float64()), ("induce", pa.float64()), ("kl", pa.float64()),
    ("discarded", pa.string()), ("chosen", pa.bool_()),
    # COSMIC's scores (pipeline/selection.py), whichever rule ran; cosmic_layer: the layer is one of its L_low
    ("cosmic_refuse", pa.float64()), ("cosmic_comply", pa.float64()), ("cosmic", pa.float64()),
    ("cosmic_layer", pa.bool_()),
    # rule: the direction.select rule that set `chosen` (auto, cosmic, or forced); picks: every rule that would
    # choose the row (comma-separated; null: none)
    ("rule", pa.string()), ("picks", pa.string()),
])

SWEEP = pa.schema([
    ("model", pa.string()), ("kind", pa.string()), ("extraction_layer", pa.int16()),
    ("extraction_position", pa.int16()), ("addition_layer", pa.int16()), ("offset", pa.int16()),
    ("coefficient", pa.float64()), ("normalized", pa.bool_()), ("label", pa.string()),
    ("logit_score", pa.float64()), ("n", pa.int32()),
])
PICKS = pa.schema([("pick", pa.string()), *[f for f in SWEEP if f.name not in ("model", "label", "n")]])

CAPABILITY = pa.schema([
    ("model", pa.string()), ("source", pa.string()), ("cell", pa.string()), ("intervention", pa.string()),
    ("coefficient", pa.float64()), ("metric", pa.string()), ("value", pa.float64()), ("n", pa.int32()),
])

LENGTH = pa.schema([
    ("model", pa.string()), ("source", pa.string()), ("cell", pa.string()), ("intervention", pa.string()),
    ("extraction_layer", pa.int16()), ("addition_layer", pa.int16()), ("coefficient", pa.float64()),
    ("label", pa.string()), ("scorer", pa.string()), ("tokens", pa.int32()), ("n", pa.int32()),
    ("refused", pa.int32()), ("ended", pa.int32()), ("refusal_rate", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()),
])

STABILITY = pa.schema([
    ("model", pa.string()), ("draw", pa.int32()), ("layer", pa.int16()), ("position", pa.int16()),
    ("n_harmful", pa.int32()), ("n_harmless", pa.int32()), ("norm", pa.float64()), ("cosine", pa.float64()),
    ("selected", pa.bool_()), ("bypass", pa.float64()), ("induce", pa.float64()), ("kl", pa.float64()),
    ("discarded", pa.string()), ("picked", pa.bool_()),
])

SUMMARY = pa.schema([
    ("model", pa.string()), ("template", pa.string()), ("source", pa.string()), ("cell", pa.string()),
    ("direction_model", pa.string()), ("extraction_layer", pa.int16()), ("extraction_position", pa.int16()),
    ("intervention", pa.string()), ("addition_layer", pa.int16()), ("coefficient", pa.float64()),
    ("normalized", pa.bool_()), ("ablation_layers", pa.string()), ("scorer", pa.string()), ("label", pa.string()),
    ("condition", pa.string()), ("picked_on", pa.string()),
    ("n", pa.int32()), ("refused", pa.int32()), ("refusal_rate", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("p_value", pa.float64()),
    ("repetition", pa.float64()), ("nll", pa.float64()), ("nll_increase", pa.float64()), ("degenerate", pa.bool_()),
])


def summary_schema(metrics: list[str]) -> pa.Schema:
    """SUMMARY plus the capability metrics present (ce_reference, ce_own, first_token_kl, kl_tokens, ...)."""
    return pa.schema([*SUMMARY, *[(m, pa.float64()) for m in metrics]])


def optimize_trials_schema(params: list[str]) -> pa.Schema:
    """optimize/{m}/trials.parquet and pareto.parquet: one row per trial of the study, its searched settings as
    columns by their dotted names; refusals, n, kl and duration are null for a trial that did not complete."""
    return pa.schema([
        ("model", pa.string()), ("method", pa.string()), ("number", pa.int32()), ("state", pa.string()),
        *[(p, pa.float64()) for p in params],
        ("refusals", pa.int32()), ("n", pa.int32()), ("kl", pa.float64()), ("duration", pa.float64()),
    ])


def vectors_column(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """A [rows, hidden] array as a FixedSizeList column (polars reads it as an Array)."""
    flat = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """The inverse of `vectors_column`: a FixedSizeList column as a [rows, hidden] array."""
    col = table.column(name).combine_chunks()
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
