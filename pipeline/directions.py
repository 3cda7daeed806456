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
from .schemas import read_parquet, selected_directions, write_parquet
from .specs import method_source


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


def at_cell(table: pa.Table, layer: int, position: int) -> pa.Table:
    """The activation rows of one layer and post-instruction position."""
    keep = (table.column("layer").to_numpy() == layer) & (table.column("position").to_numpy() == position)
    if not keep.any():
        raise ValueError(f"no cached activation at layer {layer}, position {position}")
    return table.filter(pa.array(keep))


def other_methods_table(model: str, table: pa.Table, layer: int, position: int,
                        methods: dict[str, dict]) -> pa.Table:
    """Each of `methods` (name -> settings: direction.other_methods) applied to the train activations at the
    selected `layer` and `position`, in the selected directions' schema, one row per method, source
    self-<method>: the same prompts and place as the selected direction, so only the method differs."""
    rows = at_cell(table, layer, position)
    return selected_directions(model, layer, position,
                               [(method_source(name), name, differences(rows, name, settings)[(layer, position)][0])
                                for name, settings in methods.items()])


def run_other_methods(model: str, activations_path: str, selected_path: str, out: str, *,
                      methods: dict[str, dict], filter_prompts: bool, exp_file: str) -> None:
    """The other direction methods' directions where `selected_path`'s own one was taken, from the train prompts
    the candidates were made from (filtered as they were)."""
    selected = read_parquet(selected_path).select(["source", "layer", "position"]).to_pylist()
    own = next(r for r in selected if r["source"] == "self")
    table = read_parquet(activations_path)
    if filter_prompts:
        table = filter_by_refusal(table, exp_file, model)
    write_parquet(other_methods_table(model, table, own["layer"], own["position"], methods), out,
                  vector_columns=("direction",))
