"""Stage 3a: candidate directions, one per layer x post-instruction position.

A candidate is the raw difference of means, mean(harmful) - mean(harmless), of
the cached activations at one layer and one post-instruction position; means are
accumulated in float64. With filtering on (the direction paper's default), only
harmful prompts the model refuses (logit refusal score > 0) and harmless ones it
does not (< 0) enter the means. `select` then picks one candidate.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from .errors import ConfigError
from .schemas import CANDIDATE_EXTRA, column_matrix, direction_schema, read_parquet, vectors_column, write_parquet


def filter_by_refusal(table: pa.Table, file: str, model: str = "") -> pa.Table:
    """Keep harmful rows scored > 0 and harmless rows scored < 0."""
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


def mean_differences(table: pa.Table) -> dict[tuple[int, int], tuple[np.ndarray, int, int]]:
    """(layer, position) -> (raw mean difference in float64, n_harmful, n_harmless)."""
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
            diff = acts[harm].astype(np.float64).mean(0) - acts[safe].astype(np.float64).mean(0)
            out[(int(layer), int(pos))] = (diff, int(harm.sum()), int(safe.sum()))
    return out


def candidates_table(model: str, diffs: dict) -> pa.Table:
    keys = sorted(diffs)
    matrix = np.stack([diffs[k][0] for k in keys]).astype(np.float32)
    schema = direction_schema(matrix.shape[1], CANDIDATE_EXTRA)
    return pa.table({
        "model": [model] * len(keys),
        "n_harmful": [diffs[k][1] for k in keys], "n_harmless": [diffs[k][2] for k in keys],
        "layer": [k[0] for k in keys], "position": [k[1] for k in keys],
        "norm": [float(np.linalg.norm(diffs[k][0])) for k in keys],
        "direction": vectors_column(matrix, pa.float32()),
    }, schema=schema)


def run(model: str, activations_path: str, candidates_out: str, *, filter_prompts: bool, exp_file: str) -> None:
    table = read_parquet(activations_path)
    if filter_prompts:
        table = filter_by_refusal(table, exp_file, model)
    write_parquet(candidates_table(model, mean_differences(table)), candidates_out, vector_columns=("direction",))
