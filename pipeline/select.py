"""Stage 3b: score every candidate direction and choose one (Arditi et al.'s selection).

For each candidate (layer x post-instruction position) on the val prompts:

* bypass  = mean logit refusal score on harmful prompts with the candidate ablated everywhere;
* induce  = mean score on harmless prompts with the raw candidate added (coefficient 1)
            at its layer's input;
* kl      = mean KL(baseline || ablated) of the last-position next-token distribution on
            harmless prompts.

Candidates with a NaN, a layer >= int(max_layer_fraction x n_layers), kl > kl_max or
induce < induce_min are discarded; the lowest bypass wins. A model YAML (or the
experiment) can force a (layer, position) instead, which skips the scoring.
"""

from __future__ import annotations

import math
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from .config import Selection
from .errors import ConfigError
from .figures import pyplot, to_png
from .interventions import Edit, make_edit
from .models import LoadedModel
from .refusal import refusal_score, refusal_token_ids
from .schemas import (SELECTED_EXTRA, SELECTION, column_matrix, direction_schema, read_parquet, vectors_column,
                      write_bytes, write_parquet)
from .probes import kl_divergence, last_logits, val_prompts



def score_candidates(lm: LoadedModel, candidates: pa.Table, harmful: list[str], harmless: list[str],
                     rules: Selection) -> pl.DataFrame:
    ids = refusal_token_ids(lm.tok, lm.spec)
    bs = rules.batch_size
    base_harmless = last_logits(lm, harmless, Edit(), bs)
    induce_floor = rules.induce_min + (refusal_score(base_harmless, ids).mean().item() if rules.induce_relative else 0.0)
    vectors = column_matrix(candidates, "direction")
    layers = candidates.column("layer").to_pylist()
    positions = candidates.column("position").to_pylist()
    max_layer = int(rules.max_layer_fraction * lm.rmap.n_layers)
    rows = []
    for i in tqdm(range(len(layers)), desc=f"select {lm.spec.name}", leave=False):
        layer, pos = layers[i], positions[i]
        d = torch.from_numpy(vectors[i].astype(np.float32))
        row = {"layer": layer, "position": pos, "norm": float(d.norm()),
               "bypass": math.nan, "induce": math.nan, "kl": math.nan}
        if layer >= max_layer:
            row["discarded"] = f"layer >= {max_layer}"
        elif not rules.evaluates(layer, pos):
            row["discarded"] = "not evaluated"
        if row.get("discarded"):
            rows.append(row)
            continue
        ablation = make_edit("ablation", direction=d)
        row["bypass"] = refusal_score(last_logits(lm, harmful, ablation, bs), ids).mean().item()
        added = last_logits(lm, harmless, make_edit("addition", direction=d, layer=layer, coefficient=1.0), bs)
        row["induce"] = refusal_score(added, ids).mean().item()
        row["kl"] = kl_divergence(base_harmless, last_logits(lm, harmless, ablation, bs)).mean().item()
        row["discarded"] = discard_reason(row, rules, induce_floor)
        rows.append(row)
    return pl.DataFrame(rows, schema_overrides={"discarded": pl.String})


def discard_reason(row: dict, rules: Selection, induce_floor: float | None = None) -> str | None:
    """Why a candidate is discarded, or None. `induce_floor`: the induce threshold in score units."""
    floor = rules.induce_min if induce_floor is None else induce_floor
    if any(math.isnan(row[k]) for k in ("bypass", "induce", "kl")):
        return "NaN score"
    if row["kl"] > rules.kl_max:
        return f"kl {row['kl']:.3f} > {rules.kl_max}"
    if row["induce"] < floor:
        return f"induce {row['induce']:.2f} < {floor:.2f}"
    return None


def choose(scores: pl.DataFrame, model: str, model_file: str) -> tuple[int, int]:
    alive = scores.filter(pl.col("discarded").is_null())
    if alive.height == 0:
        evaluated = scores.filter(~pl.col("bypass").is_nan()).sort("bypass").head(3)
        closest = "; ".join(f"layer {r['layer']} pos {r['position']} (bypass {r['bypass']:.2f}: {r['discarded']})"
                            for r in evaluated.iter_rows(named=True))
        raise ConfigError(model_file, "direction.force",
                          f"no candidate direction of {model} survives selection; closest: {closest or 'none'}. "
                          "Force one with direction: {layer: L, position: P, force: true}")
    best = alive.sort("bypass").row(0, named=True)
    return best["layer"], best["position"]


def heatmaps(scores: pl.DataFrame, model: str, chosen: tuple[int, int]) -> bytes:
    plt = pyplot()

    layers = sorted(scores["layer"].unique().to_list())
    positions = sorted(scores["position"].unique().to_list())
    fig, axes = plt.subplots(1, 3, figsize=(12, max(3.5, 0.22 * len(layers) + 1.5)))
    for ax, metric in zip(axes, ("bypass", "induce", "kl")):
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


def selection_table(model: str, scores: pl.DataFrame, chosen: tuple[int, int]) -> pa.Table:
    df = scores.with_columns(model=pl.lit(model),
                             chosen=(pl.col("layer") == chosen[0]) & (pl.col("position") == chosen[1]))
    return df.select(SELECTION.names).to_arrow().cast(SELECTION)


def filter_by_score(lm: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int):
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (< 0)."""
    ids = refusal_token_ids(lm.tok, lm.spec)
    base = Edit()
    hs = refusal_score(last_logits(lm, harmful, base, batch_size), ids)
    ss = refusal_score(last_logits(lm, harmless, base, batch_size), ids)
    return ([t for t, s in zip(harmful, hs.tolist()) if s > 0],
            [t for t, s in zip(harmless, ss.tolist()) if s < 0])


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


def run(spec, prepared_dir: str, prompts_path: str, candidates_path: str, selection_out: str,
        selected_out: str, heatmap_out: str, *, forced: tuple[int, int] | None, rules: Selection,
        filter_prompts: bool, random_seed: int, device: str, threads: int, exp_file: str) -> None:
    candidates = read_parquet(candidates_path)
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
                                "bypass": math.nan, "induce": math.nan, "kl": math.nan, "discarded": None}],
                              schema_overrides={"discarded": pl.String})
        chosen = forced
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
        scores = score_candidates(lm, candidates, harmful, harmless, rules)
        chosen = choose(scores, spec.name, spec.file)
        png = heatmaps(scores, spec.name, chosen)
    diffs = {k: (column_matrix(candidates, "direction")[i].astype(np.float64), 0, 0) for i, k in enumerate(keys)}
    write_parquet(selection_table(spec.name, scores, chosen), selection_out)
    write_parquet(selected_table(spec.name, diffs, chosen[0], chosen[1], random_seed), selected_out,
                  vector_columns=("direction",))
    write_bytes(png, heatmap_out)
