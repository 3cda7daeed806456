"""Stage 3a: candidate directions, one per layer x post-instruction position.

A candidate is the experiment's direction method (`direction.method`, pipeline/direction_methods.py;
by default `mean_diff`, the raw difference of means mean(harmful) - mean(harmless) in float64)
applied to the cached activations of the train prompts at one layer and one post-instruction
position. With filtering on (the direction paper's default), only harmful prompts the model
refuses (logit refusal score > 0) and harmless ones it does not (< 0) enter. `select` then
picks one candidate. The shared pieces live in pipeline/candidates.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .candidates import candidates_table, differences, filter_by_refusal  # noqa: F401  (the stage's API)
from .schemas import read_parquet, write_parquet


def mean_differences(table: pa.Table) -> dict[tuple[int, int], tuple[np.ndarray, int, int]]:
    """(layer, position) -> (raw mean difference in float64, n_harmful, n_harmless): `differences` by
    `mean_diff`."""
    return differences(table, "mean_diff")


def run(model: str, activations_path: str, candidates_out: str, *, method: str, filter_prompts: bool,
        exp_file: str, settings: dict | None = None) -> None:
    """`method` with `settings` (`direction.method`, `direction.method_settings`) makes the candidates."""
    table = read_parquet(activations_path)
    if filter_prompts:
        table = filter_by_refusal(table, exp_file, model)
    write_parquet(candidates_table(model, differences(table, method, settings), method, settings), candidates_out,
                  vector_columns=("direction",))
