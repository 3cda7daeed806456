"""Stage 3b: score every candidate direction and choose one by `direction.select`'s rule (pipeline/selection.py:
Arditi et al.'s lowest bypass, or COSMIC's highest cosine score; each rule's scores and picks are recorded).
A model YAML (or the experiment) can force a (layer, position) instead, which skips the scoring.
Writes the scores, the chosen direction with a random control of the same norm, and heatmaps.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa

from .config import Selection
from .direction_methods import method_of
from .errors import ConfigError
from .figures import pyplot, to_png
from .models import LoadedModel
from .probes import val_prompts
from .schemas import (SELECTION, column_matrix, read_parquet, selected_directions,
                      write_bytes, write_parquet)
from .selection import SCORES, SELECTORS, choose, filter_by_score, score_candidates


def heatmaps(scores: pl.DataFrame, model: str, chosen: tuple[int, int],
             metrics: tuple[str, ...] = ("bypass", "induce", "kl")) -> bytes:
    plt = pyplot()

    layers = sorted(scores["layer"].unique().to_list())
    positions = sorted(scores["position"].unique().to_list())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), max(3.5, 0.22 * len(layers) + 1.5)))
    for ax, metric in zip(axes, metrics):
        grid = np.full((len(layers), len(positions)), np.nan)
        for r in scores.iter_rows(named=True):
            grid[layers.index(r["layer"]), positions.index(r["position"])] = r[metric]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(positions)), positions)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("position (from end)")
        ax.set_ylabel("layer")
        ax.set_title(metric)
        ax.plot(positions.index(chosen[1]), layers.index(chosen[0]), marker="*", color="red", markersize=14)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{model}: candidate directions (star = chosen)")
    fig.tight_layout()
    return to_png(fig)


def selection_table(model: str, scores: pl.DataFrame, chosen: tuple[int, int], rule: str = "auto") -> pa.Table:
    df = scores.with_columns(model=pl.lit(model), rule=pl.lit(rule),
                             chosen=(pl.col("layer") == chosen[0]) & (pl.col("position") == chosen[1]))
    return df.select(SELECTION.names).to_arrow().cast(SELECTION)


def placeholder_png(text: str) -> bytes:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    return to_png(fig)


def random_like(direction: np.ndarray, seed: int) -> np.ndarray:
    """A Gaussian direction with the same norm: the control for 'any direction would do'."""
    r = np.random.default_rng(seed).standard_normal(direction.shape[0])
    return r / np.linalg.norm(r) * np.linalg.norm(direction)


def selected_table(model: str, diffs: dict, layer: int, position: int, random_seed: int,
                   method: str = "mean_diff") -> pa.Table:
    """The chosen candidate (`method`: what made it) and its random control (no method)."""
    chosen = diffs[(layer, position)][0]
    return selected_directions(model, layer, position,
                               [("self", method, chosen), ("random", None, random_like(chosen, random_seed))])


def run(spec, prepared_dir: str, prompts_path: str, candidates_path: str, selection_out: str,
        selected_out: str, heatmap_out: str, *, forced: tuple[int, int] | None, rules: Selection,
        filter_prompts: bool, random_seed: int, device: str, threads: int, exp_file: str,
        rule: str = "auto") -> None:
    """`rule`: direction.select's rule choosing (a key of selection.SELECTORS) unless `forced` is given."""
    candidates = read_parquet(candidates_path)
    method = method_of(candidates)
    keys = list(zip(candidates.column("layer").to_pylist(), candidates.column("position").to_pylist()))
    if forced is not None:
        if forced not in keys:
            n_layers = max(k[0] for k in keys) + 1
            n_post = -min(k[1] for k in keys)
            raise ConfigError(spec.file, "direction", f"(layer {forced[0]}, position {forced[1]}) is not a candidate: "
                              f"layers 0..{n_layers - 1}, positions -{n_post}..-1")
        i = keys.index(forced)
        scores = pl.DataFrame([{"layer": forced[0], "position": forced[1],
                                "norm": float(np.linalg.norm(column_matrix(candidates, "direction")[i])),
                                **{k: math.nan for k in SCORES}, "cosmic_layer": None, "discarded": None,
                                "picks": None}],
                              schema_overrides={"discarded": pl.String, "cosmic_layer": pl.Boolean,
                                                "picks": pl.String})
        chosen, rule = forced, "forced"
        png = placeholder_png(f"{spec.name}: direction forced at layer {forced[0]}, position {forced[1]}")
    else:
        lm = LoadedModel(spec, prepared_dir, device, threads)
        harmful, harmless = val_prompts(prompts_path)
        if filter_prompts:
            harmful, harmless = filter_by_score(lm, harmful, harmless, rules.batch_size)
        for label, texts in (("harmful", harmful), ("harmless", harmless)):
            if not texts:
                raise ConfigError(exp_file, "direction.filter",
                                  f"no {label} val prompt left after filtering by the refusal score for {spec.name}; "
                                  "check refusal_tokens and the template, or force the direction")
        scores = score_candidates(lm, candidates, harmful, harmless, rules, rule)
        chosen = choose(scores, spec.name, spec.file, rule)
        png = heatmaps(scores, spec.name, chosen, SELECTORS[rule].heatmap)
    diffs = {k: (column_matrix(candidates, "direction")[i].astype(np.float64), 0, 0) for i, k in enumerate(keys)}
    write_parquet(selection_table(spec.name, scores, chosen, rule), selection_out)
    write_parquet(selected_table(spec.name, diffs, chosen[0], chosen[1], random_seed, method), selected_out,
                  vector_columns=("direction",))
    write_bytes(png, heatmap_out)
