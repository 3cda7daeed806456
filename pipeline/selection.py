"""Arditi et al.'s selection rule, shared by the select stage and the stability analysis's reselection
(pipeline/stability.py), so a draw is scored and chosen exactly as the full data is.

For each candidate (layer x post-instruction position) on the val prompts:

* bypass  = mean logit refusal score on harmful prompts with the candidate ablated everywhere;
* induce  = mean score on harmless prompts with the raw candidate added (coefficient 1)
            at its layer's input;
* kl      = mean KL(baseline || ablated) of the last-position next-token distribution on
            harmless prompts.

Candidates with a NaN, a layer >= int(max_layer_fraction x n_layers), kl > kl_max or
induce < induce_min are discarded; the lowest bypass wins.
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
from .interventions import Edit, make_edit
from .models import LoadedModel
from .probes import kl_divergence, last_logits
from .refusal import refusal_score, refusal_token_ids
from .schemas import column_matrix


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


def filter_by_score(lm: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int):
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (< 0)."""
    ids = refusal_token_ids(lm.tok, lm.spec)
    base = Edit()
    hs = refusal_score(last_logits(lm, harmful, base, batch_size), ids)
    ss = refusal_score(last_logits(lm, harmless, base, batch_size), ids)
    return ([t for t, s in zip(harmful, hs.tolist()) if s > 0],
            [t for t, s in zip(harmless, ss.tolist()) if s < 0])
