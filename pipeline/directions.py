"""Stage 3: candidate directions and the direction each model is steered with.

A candidate is the raw difference of means, mean(harmful) - mean(harmless), of
the cached activations at one layer and one post-instruction position; means are
accumulated in float64. The grid uses the configured (layer, position) of each
model, plus a random control direction of the same norm.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .errors import ConfigError
from .schemas import (CANDIDATE_EXTRA, SELECTED_EXTRA, column_matrix, direction_schema, read_parquet,
                      vectors_column, write_parquet)


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


def random_like(direction: np.ndarray, seed: int) -> np.ndarray:
    """A Gaussian direction with the same norm: the control for 'any direction would do'."""
    r = np.random.default_rng(seed).standard_normal(direction.shape[0])
    return r / np.linalg.norm(r) * np.linalg.norm(direction)


def selected_table(model: str, diffs: dict, layer: int, position: int, random_seed: int) -> pa.Table:
    chosen = diffs[(layer, position)][0]
    rows = [("self", chosen), ("random", random_like(chosen, random_seed))]
    matrix = np.stack([v for _, v in rows]).astype(np.float32)
    return pa.table({
        "model": [model] * 2, "source": [s for s, _ in rows],
        "layer": [layer] * 2, "position": [position] * 2,
        "norm": [float(np.linalg.norm(v)) for _, v in rows],
        "direction": vectors_column(matrix, pa.float32()),
    }, schema=direction_schema(matrix.shape[1], SELECTED_EXTRA))


def run(model: str, activations_path: str, candidates_out: str, selected_out: str, *,
        layer: int | None, position: int, random_seed: int, model_file: str, exp_file: str) -> None:
    diffs = mean_differences(read_parquet(activations_path))
    n_layers = max(k[0] for k in diffs) + 1
    n_post = -min(k[1] for k in diffs)
    if layer is None:
        layer = int(0.6 * n_layers)  # a middle layer, where the papers find refusal directions
    if not 0 <= layer < n_layers:
        raise ConfigError(model_file, "direction.layer", f"layer {layer} is outside 0..{n_layers - 1}")
    if not -n_post <= position <= -1:
        raise ConfigError(model_file, "direction.position",
                          f"position {position} is outside the {n_post} post-instruction tokens (-{n_post}..-1)")
    write_parquet(candidates_table(model, diffs), candidates_out, vector_columns=("direction",))
    write_parquet(selected_table(model, diffs, layer, position, random_seed), selected_out,
                  vector_columns=("direction",))
