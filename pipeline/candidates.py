"""Candidate directions from cached activations: which train prompts enter them, one direction per
layer x post-instruction position by the experiment's direction method, and the candidates.parquet
layout. Shared by the directions stage and the stability analysis (pipeline/stability.py), so a
bootstrap draw's candidates are made and laid out as the stage's are.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa

from .direction_methods import method as direction_method, with_method_settings
from .errors import ConfigError
from .interventions import INTERVENTIONS, Target  # the registry and the Target type: no torch
from .schemas import CANDIDATE_EXTRA, column_matrix, direction_schema, read_parquet, vectors_column
from .specs import source_method


def filter_by_refusal(table: pa.Table, file: str, model: str = "") -> pa.Table:
    """Keep harmful rows scored > 0 and harmless rows scored < 0."""
    import polars as pl  # only this filter uses polars: the directions jobs start without it

    df = pl.from_arrow(table.select(["label", "refusal_score"]))
    keep = ((pl.col("label") == "harmful") & (pl.col("refusal_score") > 0)) | (
        (pl.col("label") == "harmless") & (pl.col("refusal_score") < 0))
    mask = df.select(keep).to_series()
    kept = df.filter(mask)
    for label in ("harmful", "harmless"):
        if kept.filter(pl.col("label") == label).height == 0:
            raise ConfigError(file, "direction.filter",
                              f"filtering by the logit refusal score leaves no {label} train prompt of {model}; "
                              "check the model's refusal_tokens and template, or set direction.filter: false")
    return table.filter(pa.array(mask.to_numpy()))


def differences(table: pa.Table, method: str, settings: dict | None = None
                ) -> dict[tuple[int, int], tuple[np.ndarray, int, int]]:
    """(layer, position) -> (the method's direction (with `settings`) in float64, n_harmful, n_harmless)."""
    make = direction_method(method, settings)
    acts = column_matrix(table, "act")
    labels = table.column("label").to_numpy(zero_copy_only=False)
    layers = table.column("layer").to_numpy()
    positions = table.column("position").to_numpy()
    out = {}
    for layer in np.unique(layers):
        for pos in np.unique(positions):
            at = (layers == layer) & (positions == pos)
            harm, safe = at & (labels == "harmful"), at & (labels == "harmless")
            if not harm.any() or not safe.any():
                raise ValueError(f"layer {layer} position {pos}: need both harmful and harmless activations")
            out[(int(layer), int(pos))] = (make.direction(acts[harm], acts[safe]), int(harm.sum()), int(safe.sum()))
    return out


def candidates_table(model: str, diffs: dict, method: str = "mean_diff", settings: dict | None = None) -> pa.Table:
    """`diffs` as `differences` gives them, made by `method` (the table's `method` column) with `settings`
    (its `method_settings` metadata, pipeline/direction_methods.py)."""
    keys = sorted(diffs)
    matrix = np.stack([diffs[k][0] for k in keys]).astype(np.float32)
    schema = direction_schema(matrix.shape[1], CANDIDATE_EXTRA)
    return with_method_settings(pa.table({
        "model": [model] * len(keys), "method": [method] * len(keys),
        "n_harmful": [diffs[k][1] for k in keys], "n_harmless": [diffs[k][2] for k in keys],
        "layer": [k[0] for k in keys], "position": [k[1] for k in keys],
        "norm": [float(np.linalg.norm(diffs[k][0])) for k in keys],
        "direction": vectors_column(matrix, pa.float32()),
    }, schema=schema), settings or {})


@functools.lru_cache(maxsize=4)
def harmless_means(activations_path: str, position: int) -> np.ndarray:
    """The mean block input over the harmless train prompts at `position`, for every layer: [n_layers, hidden],
    float64 (what affine ablation sets the direction's component to). Read once per job, however many of its
    cells need it; the array is read-only, being shared."""
    table = read_parquet(activations_path)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    layers = table.column("layer").to_numpy()
    at = (labels == "harmless") & (table.column("position").to_numpy() == position)
    if not at.any():
        raise ValueError(f"{activations_path}: no harmless activation at position {position}")
    acts = column_matrix(table.filter(pa.array(at)), "act").astype(np.float64)
    layers = layers[at]
    means = np.stack([acts[layers == layer].mean(0) for layer in range(int(layers.max()) + 1)])
    means.flags.writeable = False
    return means


def load_direction(selected_path: str, source: str):
    """(direction as a torch tensor, layer, position, direction_model) from a selected-directions file; shared
    by the generate stage's cells and the optimize stage's trials."""
    import torch  # only the model jobs read a direction as a tensor; the directions stage needs no torch

    table = read_parquet(selected_path)
    # a grid cell's source names its row, except a partner model's (its own direction, self) and the picks'
    want = source if source == "random" or source_method(source) else "self"
    rows = [i for i, s in enumerate(table.column("source").to_pylist()) if s == want]
    if not rows:
        raise ValueError(f"{selected_path}: no '{want}' direction")
    i = rows[0]
    vec = torch.from_numpy(column_matrix(table, "direction")[i].copy())
    return (vec, table.column("layer")[i].as_py(), table.column("position")[i].as_py(),
            table.column("model")[i].as_py())


def own_target(selected_path: str, activations_path: str | None, method: str):
    """The model's own selected direction as an edit's `Target` (and its harmless means where the `method` kind
    reads activations): what the optimize study's trials and their generated cells edit."""
    direction, layer, position, owner = load_direction(selected_path, "self")
    means = harmless_means(activations_path, position) if INTERVENTIONS.get(method).reads_activations else None
    return Target(direction=direction, layer=layer, position=position, model=owner, harmless_means=means)
