"""Stage 3c: the cheap sweep. Where to extract, where to add, how much.

Both papers add a direction at the layer it was extracted from. This stage scores
every (extraction layer x addition layer x coefficient) cell of a declared range
by the logit refusal score on the harmless val prompts (one forward pass per
prompt batch, no generation), and ablation of each extraction layer's direction on
the harmful val prompts. It then picks the cells worth generating:

* best<i>:   the i-th highest induce score;
* same<i>:   best<i>'s direction added at its own extraction layer (the papers' choice),
             same coefficient: the comparison the sweep exists for;
* spread<i>: cells spread over the score range, so the report can check how well the
             logit score predicts generated refusals;
* ablate<i>: the i-th lowest bypass score;
* cell<i>:   cells declared in the experiment YAML.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from .specs import SweepSpec
from .errors import ConfigError
from .figures import pyplot, to_png
from .interventions import Edit, make_edit
from .models import LoadedModel
from .refusal import refusal_score, refusal_token_ids
from .schemas import PICKS, SWEEP, column_matrix, read_parquet, write_bytes, write_parquet
from .prefix import edited_passes
from .probes import val_prompts

ROW_SCHEMA = {"kind": pl.String, "extraction_layer": pl.Int64, "extraction_position": pl.Int64,
              "addition_layer": pl.Int64, "offset": pl.Int64, "coefficient": pl.Float64, "normalized": pl.Boolean,
              "label": pl.String, "logit_score": pl.Float64, "n": pl.Int64}


def sweep_position(spec: SweepSpec, selected_path: str) -> int:
    """The sweep's extraction position: declared, or the selected direction's."""
    if spec.position is not None:
        return spec.position
    table = read_parquet(selected_path)
    return int(table.column("position")[0].as_py())


def score_cells(lm: LoadedModel, candidates: pa.Table, harmful: list[str], harmless: list[str],
                spec: SweepSpec, position: int, normalize: bool,
                ablation_layers: tuple[int, int] | None, known_bypass: dict | None = None) -> pl.DataFrame:
    """One row per scored cell: mean logit refusal score on the val prompts of the cell's label.

    `known_bypass`: {(layer, position): score} already measured by the select stage on the same
    prompts with the same ablation, reused instead of recomputed.
    """
    known_bypass = known_bypass or {}
    ids = refusal_token_ids(lm.tok, lm.spec)
    n_layers = lm.rmap.n_layers
    vectors = column_matrix(candidates, "direction")
    keys = list(zip(candidates.column("layer").to_pylist(), candidates.column("position").to_pylist()))

    def mean_scores(texts: list[str], edits: list[Edit], desc: str) -> list[float]:
        """Each edit's mean score; an addition's pass starts at its block (prefix.edited_passes)."""
        passes = edited_passes(lm, texts, edits, spec.batch_size, per_row=lambda logits: refusal_score(logits, ids),
                               desc=desc)
        return [scores.mean().item() for scores, _ in passes]

    def direction(layer: int) -> torch.Tensor:
        return torch.from_numpy(vectors[keys.index((layer, position))].astype(np.float32))

    layers = spec.extraction_layers if spec.extraction_layers is not None else range(n_layers)
    cells = [(e, e + o, c) for e in layers for o in spec.offsets for c in spec.coefficients if 0 <= e + o < n_layers]
    cells += [c for c in spec.cells if c not in cells]
    added = [make_edit("addition", direction=direction(e), layer=a, coefficient=c, normalize=normalize)
             for e, a, c in cells]
    # ablation of each layer's direction, unless selection scored it already on the same prompts
    ablated = {e: known_bypass.get((e, position), math.nan) for e in (layers if spec.ablation else [])}
    to_ablate = [e for e, score in ablated.items() if math.isnan(score)]
    harmless_scores = mean_scores(harmless, [Edit(), *added], f"sweep {lm.spec.name}")
    harmful_scores = mean_scores(harmful, [Edit(), *(make_edit("ablation", direction=direction(e), layers=ablation_layers)
                                                     for e in to_ablate)], f"sweep ablation {lm.spec.name}")
    ablated.update(zip(to_ablate, harmful_scores[1:]))

    base = dict(extraction_layer=None, extraction_position=None, addition_layer=None, offset=None,
                coefficient=None, normalized=None)
    rows = [{**base, "kind": "baseline", "label": label, "n": len(texts), "logit_score": score}
            for label, texts, score in (("harmful", harmful, harmful_scores[0]),
                                        ("harmless", harmless, harmless_scores[0]))]
    for (e, a, c), score in zip(cells, harmless_scores[1:]):
        rows.append({"kind": "addition", "extraction_layer": e, "extraction_position": position, "addition_layer": a,
                     "offset": a - e, "coefficient": c, "normalized": normalize, "label": "harmless",
                     "n": len(harmless), "logit_score": score})
    for e, score in ablated.items():
        rows.append({**base, "kind": "ablation", "extraction_layer": e, "extraction_position": position,
                     "label": "harmful", "n": len(harmful), "logit_score": score})
    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def pick_cells(scores: pl.DataFrame, spec: SweepSpec) -> pl.DataFrame:
    """The cells to generate, named as in `SweepSpec.pick_names` (in that order)."""
    axes = ["kind", "extraction_layer", "extraction_position", "addition_layer", "offset", "coefficient",
            "normalized", "logit_score"]
    # a NaN score (e.g. a zero direction has no unit vector) is no score: polars would sort it first
    scored = scores.filter(pl.col("logit_score").is_finite())
    added = scored.filter(pl.col("kind") == "addition").sort(
        ["logit_score", "extraction_layer", "addition_layer"], descending=[True, False, False])
    ablated = scored.filter(pl.col("kind") == "ablation").sort(["logit_score", "extraction_layer"])
    picks: list[tuple[str, dict]] = []
    ranked = list(added.iter_rows(named=True))
    if not ranked or (spec.ablation and spec.top_ablation and ablated.height == 0):
        raise ValueError("no swept cell has a finite logit score (a zero direction, or a broken model)")
    for i in range(spec.top):
        best = ranked[min(i, len(ranked) - 1)]
        picks.append((f"best{i + 1}", best))
    for i in range(spec.top):
        best = picks[i][1]
        same = added.filter((pl.col("extraction_layer") == best["extraction_layer"]) & (pl.col("offset") == 0)
                            & (pl.col("coefficient") == best["coefficient"]))
        picks.append((f"same{i + 1}", same.row(0, named=True)))
    taken = {_key(r) for _, r in picks}
    for i, rank in enumerate(np.linspace(0, len(ranked) - 1, spec.spread + 1)[1:].round().astype(int)):
        # the unpicked cell nearest to this rank, so spread cells are distinct from the best ones
        order = sorted(range(len(ranked)), key=lambda j: (abs(j - rank), -j))
        j = next((j for j in order if _key(ranked[j]) not in taken), order[0])
        taken.add(_key(ranked[j]))
        picks.append((f"spread{i + 1}", ranked[j]))
    if spec.ablation:
        rows = list(ablated.iter_rows(named=True))
        for i in range(spec.top_ablation):
            picks.append((f"ablate{i + 1}", rows[min(i, len(rows) - 1)]))
    declared = scores.filter(pl.col("kind") == "addition")  # generated whatever their score
    for i, (e, a, c) in enumerate(spec.cells):
        match = declared.filter((pl.col("extraction_layer") == e) & (pl.col("addition_layer") == a)
                             & (pl.col("coefficient") == c))
        picks.append((f"cell{i + 1}", match.row(0, named=True)))
    return pl.DataFrame([{"pick": name, **{k: r[k] for k in axes}} for name, r in picks],
                        schema={"pick": pl.String, **{k: scores.schema[k] for k in axes}})


def _key(row: dict) -> tuple:
    return row["extraction_layer"], row["addition_layer"], row["coefficient"]


def heatmaps(scores: pl.DataFrame, picks: pl.DataFrame, model: str) -> bytes:
    """One extraction x addition panel per coefficient (induce, harmless val) and an ablation panel."""
    plt = pyplot()

    added = scores.filter(pl.col("kind") == "addition")
    ablated = scores.filter(pl.col("kind") == "ablation").sort("extraction_layer")
    coefs = sorted(added["coefficient"].unique().to_list())
    ext = sorted(added["extraction_layer"].unique().to_list())
    add = list(range(min(added["addition_layer"]), max(added["addition_layer"]) + 1))
    panels = len(coefs) + (1 if ablated.height else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, max(3.8, 0.28 * len(ext) + 2)), squeeze=False)
    vmin, vmax = added["logit_score"].min(), added["logit_score"].max()
    baseline = scores.filter(pl.col("kind") == "baseline")
    base = {r["label"]: r["logit_score"] for r in baseline.iter_rows(named=True)}
    best = picks.filter(pl.col("pick") == "best1").row(0, named=True) if picks.height else None
    for ax, c in zip(axes[0], coefs):
        grid = np.full((len(ext), len(add)), np.nan)
        for r in added.filter(pl.col("coefficient") == c).iter_rows(named=True):
            grid[ext.index(r["extraction_layer"]), add.index(r["addition_layer"])] = r["logit_score"]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(add)), add, fontsize=7)
        ax.set_yticks(range(len(ext)), ext, fontsize=7)
        ax.set_xlabel("addition layer")
        ax.set_ylabel("extraction layer")
        ax.set_title(f"induce score, coefficient {c:g}\n(harmless val; unsteered {base.get('harmless', math.nan):.2f})",
                     fontsize=9)
        for e in ext:  # the papers' cells: added where extracted
            if e in add:
                ax.plot(add.index(e), ext.index(e), marker="s", mfc="none", color="cyan", markersize=7)
        if best is not None and best["coefficient"] == c:
            ax.plot(add.index(best["addition_layer"]), ext.index(best["extraction_layer"]),
                    marker="*", color="lime", markersize=14)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if ablated.height:
        ax = axes[0][-1]
        ax.plot(ablated["extraction_layer"].to_list(), ablated["logit_score"].to_list(), marker="o")
        ax.axhline(base.get("harmful", math.nan), color="grey", linestyle="--", label="unsteered")
        ax.set_xlabel("extraction layer (direction ablated at every layer)")
        ax.set_ylabel("bypass score (harmful val)")
        ax.set_title("ablation", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{model}: logit refusal score sweep (star = best, squares = same-layer cells)", fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def bypass_scores(selection_path: str | None) -> dict:
    """The select stage's bypass score per (layer, position), where it scored candidates."""
    if selection_path is None:
        return {}
    sel = pl.read_parquet(selection_path).filter(~pl.col("bypass").is_nan())
    return {(r["layer"], r["position"]): r["bypass"] for r in sel.iter_rows(named=True)}


def run(spec, prepared_dir: str, prompts_path: str, candidates_path: str, selected_path: str,
        sweep_out: str, picks_out: str, heatmap_out: str, *, sweep: SweepSpec, normalize: bool,
        ablation_layers: tuple[int, int] | None, device: str, threads: int, exp_file: str,
        selection_path: str | None = None) -> None:
    """`selection_path`: pass it only when selection scored the same val prompts (no filtering)
    with the same ablation (every layer), so its bypass scores can be reused."""
    candidates = read_parquet(candidates_path)
    layers_known = sorted(set(candidates.column("layer").to_pylist()))
    positions_known = sorted(set(candidates.column("position").to_pylist()))
    position = sweep_position(sweep, selected_path)
    if position not in positions_known:
        raise ConfigError(exp_file, "sweep.position", f"{position} is not a post-instruction position of "
                          f"{spec.name} ({positions_known[0]}..-1)")
    for layer in sweep.extraction_layers or []:
        if layer not in layers_known:
            raise ConfigError(exp_file, "sweep.extraction_layers", f"layer {layer} is outside "
                              f"0..{layers_known[-1]} for {spec.name}")
    for i, (e, a, _) in enumerate(sweep.cells):
        if e not in layers_known or a not in layers_known:
            raise ConfigError(exp_file, f"sweep.generate.cells[{i}]", f"layers must be in 0..{layers_known[-1]}")
    lm = LoadedModel(spec, prepared_dir, device, threads)
    harmful, harmless = val_prompts(prompts_path)
    scores = score_cells(lm, candidates, harmful, harmless, sweep, position, normalize, ablation_layers,
                         known_bypass=bypass_scores(selection_path))
    picks = pick_cells(scores, sweep)
    write_parquet(scores.with_columns(model=pl.lit(spec.name)).select(SWEEP.names).to_arrow().cast(SWEEP),
                  sweep_out)
    write_parquet(picks.to_arrow().cast(PICKS), picks_out)
    write_bytes(heatmaps(scores, picks, spec.name), heatmap_out)
