"""Direction selection rules, shared by the select stage and the stability analysis's reselection
(pipeline/stability.py), so a draw is scored and chosen exactly as the full data is.

Every candidate (layer x post-instruction position) is scored on the val prompts for every rule, in the
same forward passes, so the selection table shows what each rule would pick (`picks`):

* bypass  = mean logit refusal score on harmful prompts with the candidate ablated everywhere;
* induce  = mean score on harmless prompts with the raw candidate added (coefficient 1)
            at its layer's input;
* kl      = mean KL(baseline || ablated) of the last-position next-token distribution on
            harmless prompts;
* cosmic_refuse = cos(H(harmful | ablated), H(harmless)), cosmic_comply = cos(H(harmless | added),
  H(harmful)), cosmic = their sum (COSMIC, Siu et al. 2025, arXiv 2506.00085). H(X | edit) is the mean
  over the prompts X of the block inputs at the post-instruction positions of the layers L_low,
  concatenated into one vector; L_low is the `cosmic_layer_fraction` of layers (at least one) where the
  unedited harmful and harmless means (concatenated over positions) have the lowest cosine.

Rules (`direction.select`, the mapping SELECTORS below):

* auto   (Arditi et al.): discard a NaN, kl > kl_max or induce < induce_min; the lowest bypass wins;
* cosmic (Siu et al.): discard a NaN or kl > kl_max (their code's KL filter); the highest cosmic wins.

Both discard a layer >= int(max_layer_fraction x n_layers) and the candidates `layers`/`positions` leave out.
Without refusal tokens in the model YAML, cosmic still runs (bypass and induce are then NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from tqdm import tqdm

from .config import Selection
from .errors import ConfigError
from .interventions import Edit, make_edit
from .models import LoadedModel
from .prefix import edited_passes
from .probes import kl_divergence, last_logits
from .refusal import refusal_score, refusal_token_ids
from .schemas import column_matrix
from .specs import rule_pick_name

SCORES = ("bypass", "induce", "kl", "cosmic_refuse", "cosmic_comply", "cosmic")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the two tensors flattened into vectors (COSMIC's concatenation over layers and positions)."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def cosmic_layers(harmful_means: torch.Tensor, harmless_means: torch.Tensor, fraction: float) -> list[int]:
    """L_low: the int(fraction x n_layers) layers (at least one) whose harmful and harmless means
    ([n_layers, n_post, hidden]) are least alike by cosine, in layer order (ties: the lower layer)."""
    n_layers = harmful_means.shape[0]
    sims = np.array([cosine(harmful_means[l], harmless_means[l]) for l in range(n_layers)])
    keep = max(1, int(fraction * n_layers))
    return sorted(np.argsort(sims, kind="stable")[:keep].tolist())


def score_candidates(lm: LoadedModel, candidates: pa.Table, harmful: list[str], harmless: list[str],
                     rules: Selection, rule: str = "auto") -> pl.DataFrame:
    """Every rule's scores per candidate; `discarded` is `rule`'s reason, `picks` the rules picking a row."""
    selector = SELECTORS[rule]
    # COSMIC needs no refusal token: a model without them still gets its cosine scores
    ids = refusal_token_ids(lm.tok, lm.spec) if selector.needs_refusal_tokens or lm.spec.refusal_tokens else None
    bs = rules.batch_size
    every = list(range(lm.rmap.n_layers))
    [(base_harmless, harmless_means)] = edited_passes(lm, harmless, [Edit()], bs, layers=every)
    [(_, harmful_means)] = edited_passes(lm, harmful, [Edit()], bs, layers=every)
    low = cosmic_layers(harmful_means, harmless_means, rules.cosmic_layer_fraction)
    induce_floor = rules.induce_min + (refusal_score(base_harmless, ids).mean().item()
                                       if ids is not None and rules.induce_relative else 0.0)
    vectors = column_matrix(candidates, "direction")
    layers = candidates.column("layer").to_pylist()
    positions = candidates.column("position").to_pylist()
    max_layer = int(rules.max_layer_fraction * lm.rmap.n_layers)
    rows, scored = [], []
    for i in range(len(layers)):
        layer, pos = layers[i], positions[i]
        d = torch.from_numpy(vectors[i].astype(np.float32))
        row = {"layer": layer, "position": pos, "norm": float(d.norm()),
               **{k: math.nan for k in SCORES}, "cosmic_layer": layer in low}
        if layer >= max_layer:
            row["discarded"] = f"layer >= {max_layer}"
        elif not rules.evaluates(layer, pos):
            row["discarded"] = "not evaluated"
        else:
            scored.append((row, d))
        rows.append(row)

    def score(logits: torch.Tensor) -> torch.Tensor:
        return refusal_score(logits, ids) if ids is not None else torch.full((len(logits),), math.nan)

    # induce: every candidate added at its own layer, each pass started there (prefix.edited_passes)
    added = edited_passes(lm, harmless, [make_edit("addition", direction=d, layer=row["layer"], coefficient=1.0)
                                         for row, d in scored], bs, per_row=score, layers=low,
                          desc=f"select {lm.spec.name} (induce)")
    for (row, d), (add_scores, add_means) in zip(tqdm(scored, desc=f"select {lm.spec.name}", leave=False), added):
        ablation = make_edit("ablation", direction=d)
        [(abl_scores, abl_means)] = edited_passes(lm, harmful, [ablation], bs, per_row=score, layers=low)
        [(abl_harmless, _)] = edited_passes(lm, harmless, [ablation], bs)
        row["bypass"] = abl_scores.mean().item()
        row["induce"] = add_scores.mean().item()
        row["kl"] = kl_divergence(base_harmless, abl_harmless).mean().item()
        row["cosmic_refuse"] = cosine(abl_means, harmless_means[low])
        row["cosmic_comply"] = cosine(add_means, harmful_means[low])
        row["cosmic"] = row["cosmic_refuse"] + row["cosmic_comply"]
    evaluated = [r for r in rows if r.get("discarded") is None]
    for row in evaluated:
        row["discarded"] = selector.discard(row, rules, induce_floor)
    picks = picked_by(evaluated, rules, induce_floor)
    for row in rows:
        row["picks"] = ",".join(picks.get((row["layer"], row["position"]), [])) or None
    return pl.DataFrame(rows, schema_overrides={"discarded": pl.String, "picks": pl.String})


def picked_by(evaluated: list[dict], rules: Selection, induce_floor: float | None = None) -> dict[tuple, list[str]]:
    """(layer, position) -> the rules (SELECTORS order) that would choose it among the evaluated rows,
    whichever rule ran: the table then shows where the rules disagree. Each rule is also applied with the
    KL cap at each of `kl_max_compare` (named auto_kl0.4, ...)."""
    picked: dict[tuple[int, int], list[str]] = {}
    for cap in [None, *rules.kl_max_compare]:
        capped = rules if cap is None else rules.model_copy(update={"kl_max": cap})
        for name, rule in SELECTORS.items():
            alive = [r for r in evaluated if rule.discard(r, capped, induce_floor) is None]
            if alive:
                best = rule.best(alive)
                picked.setdefault((best["layer"], best["position"]), []).append(rule_pick_name(name, cap))
    return picked


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


def cosmic_discard(row: dict, rules: Selection, induce_floor: float | None = None) -> str | None:
    """COSMIC's filters: its score must exist and ablation must keep harmless outputs close (kl_max)."""
    if any(math.isnan(row[k]) for k in ("cosmic", "kl")):
        return "NaN score"
    if row["kl"] > rules.kl_max:
        return f"kl {row['kl']:.3f} > {rules.kl_max}"
    return None


@dataclass(frozen=True)
class Rule:
    """A selection rule: its discard reason per scored row, and which column ranks the survivors."""

    discard: Callable[[dict, Selection, float | None], str | None]
    score: str  # the column ranking the survivors
    highest: bool  # True: the highest score wins; False: the lowest
    heatmap: tuple[str, ...]  # the columns the selection figure shows
    needs_refusal_tokens: bool = True

    def ranked(self, rows: list[dict]) -> list[dict]:
        return sorted(rows, key=lambda r: r[self.score], reverse=self.highest)

    def best(self, rows: list[dict]) -> dict:
        return self.ranked(rows)[0]


# direction.select -> its rule; a new rule is one entry here (and its name in config.Direction.select)
SELECTORS: dict[str, Rule] = {
    "auto": Rule(discard_reason, "bypass", highest=False, heatmap=("bypass", "induce", "kl")),
    "cosmic": Rule(cosmic_discard, "cosmic", highest=True, heatmap=("cosmic", "cosmic_refuse", "cosmic_comply", "kl"),
                   needs_refusal_tokens=False),
}


def choose(scores: pl.DataFrame, model: str, model_file: str, rule: str = "auto") -> tuple[int, int]:
    selector = SELECTORS[rule]
    alive = scores.filter(pl.col("discarded").is_null())
    if alive.height == 0:
        evaluated = [r for r in scores.iter_rows(named=True) if not math.isnan(r[selector.score])]
        closest = "; ".join(f"layer {r['layer']} pos {r['position']} ({selector.score} {r[selector.score]:.2f}: "
                            f"{r['discarded']})" for r in selector.ranked(evaluated)[:3])
        raise ConfigError(model_file, "direction.force",
                          f"no candidate direction of {model} survives selection; closest: {closest or 'none'}. "
                          "Force one with direction: {layer: L, position: P, force: true}")
    best = selector.best(list(alive.iter_rows(named=True)))
    return best["layer"], best["position"]


def filter_by_score(lm: LoadedModel, harmful: list[str], harmless: list[str], batch_size: int):
    """Keep harmful prompts the model refuses (score > 0) and harmless ones it does not (< 0)."""
    ids = refusal_token_ids(lm.tok, lm.spec)
    base = Edit()
    hs = refusal_score(last_logits(lm, harmful, base, batch_size), ids)
    ss = refusal_score(last_logits(lm, harmless, base, batch_size), ids)
    return ([t for t, s in zip(harmful, hs.tolist()) if s > 0],
            [t for t, s in zip(harmless, ss.tolist()) if s < 0])
