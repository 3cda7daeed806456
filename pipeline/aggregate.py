"""Stage 6: collect every scored cell into one summary, tables, charts and a report."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl

from .figures import pyplot, to_png
from .schemas import column_matrix, read_parquet, write_bytes, write_parquet, write_text

GROUP = ["model", "template", "source", "cell", "direction_model", "extraction_layer", "extraction_position",
         "intervention", "addition_layer", "coefficient", "normalized", "ablation_layers", "scorer", "label"]
CELL = ["model", "source", "cell"]  # a generated cell: cell is its file name (baseline, addition_2, best1, ...)


def condition_name(intervention: str, source: str, coefficient: float | None) -> str:
    if intervention == "baseline":
        return "baseline"
    if intervention in ("ablation", "orthogonalization"):
        return f"{intervention} ({source})"
    return f"addition {coefficient:+g} ({source})"


def cell_condition(r: dict) -> str:
    """A readable name: sweep picks carry their layers, grid cells their direction source."""
    if r["source"] != "sweep":
        return condition_name(r["intervention"], r["source"], r["coefficient"])
    if r["intervention"] == "ablation":
        return f"{r['cell']}: ablation L{r['extraction_layer']}"
    return f"{r['cell']}: addition {r['coefficient']:+g} L{r['extraction_layer']}→{r['addition_layer']}"


def summarize(scores: pl.DataFrame, coherence: dict | None = None) -> pl.DataFrame:
    coherence = coherence or {"repetition_max": 0.3, "nll_increase_max": 1.5}
    summary = (scores.group_by(GROUP)
               .agg(n=pl.len(), refused=pl.col("refused").sum(), refusal_rate=pl.col("refused").mean(),
                    repetition=pl.col("repetition").mean(), nll=pl.col("nll").fill_nan(None).mean())
               .with_columns(condition=pl.struct("source", "cell", "intervention", "coefficient", "extraction_layer",
                                                 "addition_layer").map_elements(cell_condition,
                                                                                return_dtype=pl.String)))
    base_nll = (summary.filter(pl.col("intervention") == "baseline")
                .select("model", "label", pl.col("nll").alias("_base_nll")))
    summary = summary.join(base_nll, on=["model", "label"], how="left").with_columns(
        nll_increase=pl.col("nll") - pl.col("_base_nll")).drop("_base_nll")
    summary = summary.with_columns(degenerate=(pl.col("repetition") > coherence["repetition_max"])
                                   | (pl.col("nll_increase").fill_nan(0) > coherence["nll_increase_max"]))
    order = {"baseline": 0, "ablation": 1, "orthogonalization": 2, "addition": 3}
    return summary.with_columns(_o=pl.col("intervention").replace_strict(order, return_dtype=pl.Int8),
                                _s=pl.col("source") == "sweep").sort(
        ["model", "_s", "_o", "source", "coefficient", "cell", "label"], nulls_last=False).drop("_o", "_s")


def wide_table(summary: pl.DataFrame, capability: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per model x generated cell: refusal rates per label, coherence, then capability metrics."""
    index = [*CELL, "condition", "extraction_layer", "addition_layer"]
    wide = (summary.select(*index, "label", "refusal_rate")
            .pivot(on="label", index=index, values="refusal_rate", maintain_order=True))
    for label in ("harmful", "harmless"):
        if label not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(label))
    coherent = (summary.group_by(CELL, maintain_order=True)
                .agg(repetition=pl.col("repetition").mean(), nll_increase=pl.col("nll_increase").mean(),
                     degenerate=pl.col("degenerate").any()))
    wide = (wide.select(*index, pl.col("harmful").round(3), pl.col("harmless").round(3))
            .join(coherent.with_columns(pl.col("repetition", "nll_increase").round(3)), on=CELL,
                  how="left", maintain_order="left"))
    if capability is not None and capability.height:
        metrics = (capability.pivot(on="metric", index=CELL, values="value")
                   .with_columns(pl.exclude(CELL).round(3)))
        wide = wide.join(metrics, on=CELL, how="left", maintain_order="left")
    return wide


def markdown(df: pl.DataFrame) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(wide: pl.DataFrame, model: str) -> bytes:
    plt = pyplot()

    rows = wide.filter(pl.col("model") == model)
    names = rows["condition"].to_list()
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    w = 0.4
    ax.bar([i - w / 2 for i in x], rows["harmful"].fill_null(0).to_list(), w, label="harmful", color="#c0392b")
    ax.bar([i + w / 2 for i in x], rows["harmless"].fill_null(0).to_list(), w, label="harmless", color="#2e86c1")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal rate")
    ax.set_title(f"{model}: refusal rate by condition")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return to_png(fig, dpi=110)


def examples(scores: pl.DataFrame, per_condition: int = 2) -> str:
    lines = []
    for (model, source, cell, label), grp in scores.group_by(["model", "source", "cell", "label"],
                                                              maintain_order=True):
        name = cell_condition(grp.row(0, named=True))
        for r in grp.head(per_condition).iter_rows(named=True):
            completion = r["completion"].replace("\n", " ")[:160]
            lines.append(f"- **{model} · {name} · {label}** — _{r['prompt'][:80]}_ → {completion!r}")
    return "\n".join(lines) + "\n"


def selection_section(model: str, selection_path: str, heatmap_path: str, out: Path) -> str:
    sel = pl.read_parquet(selection_path)
    chosen = sel.filter(pl.col("chosen")).row(0, named=True)
    evaluated = sel.filter(~pl.col("bypass").is_nan())
    lines = [f"### {model}", ""]
    if evaluated.height == 0:
        lines.append(f"Direction forced at layer {chosen['layer']}, position {chosen['position']} "
                     f"(norm {chosen['norm']:.2f}); no candidates scored.")
    else:
        kept = evaluated.filter(pl.col("discarded").is_null()).height
        lines.append(f"Chosen: layer {chosen['layer']}, position {chosen['position']} — bypass {chosen['bypass']:.2f}, "
                     f"induce {chosen['induce']:.2f}, KL {chosen['kl']:.3f}, norm {chosen['norm']:.2f}. "
                     f"{evaluated.height} candidates scored, {kept} passed the filters.")
        best = evaluated.sort("bypass").head(5).select("layer", "position", "bypass", "induce", "kl", "discarded")
        lines += ["", markdown(best.with_columns(pl.col("bypass", "induce").round(2), pl.col("kl").round(3)))]
    lines += ["", f"![{model} selection]({Path(heatmap_path).relative_to(out)})", ""]
    return "\n".join(lines)


PREDICTION_KEYS = ["model", "kind", "extraction_layer", "extraction_position", "addition_layer", "coefficient",
                   "label"]


def sweep_prediction(summary: pl.DataFrame, sweeps: pl.DataFrame) -> pl.DataFrame:
    """Every generated cell the sweep also scored: its val logit score beside its test refusal rate."""
    generated = (summary.filter(pl.col("source").is_in(["self", "sweep"])
                                & pl.col("intervention").is_in(["addition", "ablation"]))
                 .rename({"intervention": "kind"}))
    scored = sweeps.filter(pl.col("kind").is_in(["addition", "ablation"])).select(*PREDICTION_KEYS, "logit_score")
    casts = {k: pl.Int64 for k in ("extraction_layer", "extraction_position", "addition_layer")}
    joined = generated.with_columns(pl.col(*casts).cast(pl.Int64)).join(
        scored.with_columns(pl.col(*casts).cast(pl.Int64)), on=PREDICTION_KEYS, how="inner", nulls_equal=True)
    return (joined.group_by(PREDICTION_KEYS, maintain_order=True)  # one point per distinct cell
            .agg(pl.col("condition", "cell", "logit_score").first(), pl.col("refusal_rate").mean(),
                 pl.col("degenerate").any())
            .sort("model", "kind", "logit_score"))


def correlations(points: pl.DataFrame) -> pl.DataFrame:
    """Pearson and Spearman correlation of val logit score vs test refusal rate, per model and kind."""
    rows = []
    for (model, kind), grp in points.group_by(["model", "kind"], maintain_order=True):
        pearson = spearman = None
        if grp.height >= 3 and grp["refusal_rate"].std() > 0 and grp["logit_score"].std() > 0:
            pearson = grp.select(pl.corr("logit_score", "refusal_rate")).item()
            spearman = grp.select(pl.corr("logit_score", "refusal_rate", method="spearman")).item()
        rows.append({"model": model, "kind": kind, "cells": grp.height, "pearson": pearson, "spearman": spearman})
    return pl.DataFrame(rows, schema={"model": pl.String, "kind": pl.String, "cells": pl.Int64,
                                      "pearson": pl.Float64, "spearman": pl.Float64})


def prediction_scatter(points: pl.DataFrame) -> bytes:
    plt = pyplot()

    kinds = ["addition", "ablation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, kinds):
        sub = points.filter(pl.col("kind") == kind)
        for model, grp in sub.group_by("model", maintain_order=True):
            ok = grp.filter(~pl.col("degenerate"))
            bad = grp.filter(pl.col("degenerate"))
            line = ax.scatter(ok["logit_score"], ok["refusal_rate"], label=model[0])
            if bad.height:
                ax.scatter(bad["logit_score"], bad["refusal_rate"], marker="x", color=line.get_facecolor()[0],
                           label=f"{model[0]} (degenerate)")
            for r in grp.iter_rows(named=True):
                ax.annotate(r["cell"], (r["logit_score"], r["refusal_rate"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        label = "harmless" if kind == "addition" else "harmful"
        ax.set_xlabel(f"logit refusal score ({label} val prompts)")
        ax.set_ylabel(f"generated refusal rate ({label} test prompts)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{kind}: does the cheap score predict generation?", fontsize=9)
        if sub.height:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def sweep_section(model: str, sweep: pl.DataFrame, picks: pl.DataFrame, heatmap_path: str, wide: pl.DataFrame,
                  out: Path) -> str:
    added = sweep.filter(pl.col("kind") == "addition")
    base = {r["label"]: r["logit_score"] for r in sweep.filter(pl.col("kind") == "baseline").iter_rows(named=True)}
    lines = [f"### {model}", "",
             f"{added.height} addition cells and {sweep.filter(pl.col('kind') == 'ablation').height} ablation cells "
             f"scored on the val prompts (unsteered: harmful {base.get('harmful', float('nan')):.2f}, "
             f"harmless {base.get('harmless', float('nan')):.2f}).", "",
             f"![{model} sweep]({Path(heatmap_path).relative_to(out)})", "",
             "Top addition cells by logit score:", "",
             markdown(added.sort("logit_score", descending=True).head(5)
                      .select("extraction_layer", "addition_layer", "offset", "coefficient",
                              pl.col("logit_score").round(2)))]
    generated = wide.filter((pl.col("model") == model) & (pl.col("source") == "sweep"))
    if generated.height:
        lines += ["Generated sweep cells (test prompts; addition cells on harmless prompts, ablation on harmful):", "",
                  markdown(generated.with_columns(pick=pl.col("cell"))
                           .join(picks.select("pick", pl.col("logit_score").round(2)), on="pick", how="left")
                           .select("condition", "logit_score", "harmful", "harmless", "repetition", "nll_increase",
                                   "degenerate"))]
        rates = {r["cell"]: r["harmless"] for r in generated.iter_rows(named=True)}
        best = picks.filter(pl.col("pick") == "best1")
        if best.height and rates.get("best1") is not None and rates.get("same1") is not None:
            b = best.row(0, named=True)
            lines.append(f"Best cell: direction from layer {b['extraction_layer']} added at layer "
                         f"{b['addition_layer']} (coefficient {b['coefficient']:g}) → harmless refusal "
                         f"{rates['best1']:.2f}; the same direction added at its own layer → {rates['same1']:.2f}.")
            lines.append("")
    return "\n".join(lines)


def transfer_table(summary: pl.DataFrame) -> pl.DataFrame:
    """Base <-> chat transfer: each model's refusal rate with its own vs its pair partner's direction."""
    key = ["model", "intervention", "coefficient", "label"]
    rate = summary.select(*key, "source", "refusal_rate")
    partner = rate.filter(~pl.col("source").is_in(["none", "self", "random", "sweep"])).rename(
        {"source": "partner", "refusal_rate": "partner_direction"})
    if partner.height == 0:
        return partner
    own = rate.filter(pl.col("source") == "self").drop("source").rename({"refusal_rate": "own_direction"})
    base = (rate.filter(pl.col("intervention") == "baseline").select("model", "label", "refusal_rate")
            .rename({"refusal_rate": "baseline"}))
    table = (partner.join(own, on=key, how="left", nulls_equal=True)
             .join(base, on=["model", "label"], how="left")
             .with_columns(condition=pl.struct("intervention", "coefficient").map_elements(
                 lambda r: condition_name(r["intervention"], "", r["coefficient"]).replace(" ()", ""),
                 return_dtype=pl.String)))
    return (table.sort("model", "intervention", "coefficient", "label")
            .select("model", "partner", "condition", "label", pl.col("baseline").round(3),
                    pl.col("own_direction").round(3), pl.col("partner_direction").round(3)))


def direction_similarity(pairs: list[tuple[str, str]], candidates: dict[str, str],
                         selections: dict[str, tuple[str, str]]) -> pl.DataFrame:
    """Per declared pair and layer: cosine similarity of the base and chat mean-difference directions.

    Both are taken at the chat model's selected position (the last template token in the
    base-models experiments); the base <-> chat transfer claim rests on these being close.
    """
    rows = []
    for base, chat in pairs:
        chosen = pl.read_parquet(selections[chat][0]).filter(pl.col("chosen")).row(0, named=True)
        tables = {m: read_parquet(candidates[m]) for m in (base, chat)}
        vectors = {}
        for m, table in tables.items():
            keys = list(zip(table.column("layer").to_pylist(), table.column("position").to_pylist()))
            matrix = column_matrix(table, "direction").astype(np.float64)
            vectors[m] = {layer: matrix[i] for i, (layer, pos) in enumerate(keys) if pos == chosen["position"]}
        for layer in sorted(set(vectors[base]) & set(vectors[chat])):
            u, v = vectors[base][layer], vectors[chat][layer]
            norm = np.linalg.norm(u) * np.linalg.norm(v)
            rows.append({"base": base, "chat": chat, "layer": layer, "position": chosen["position"],
                         "cosine": float(u @ v / norm) if norm > 0 else float("nan"),
                         "chat_selected": layer == chosen["layer"]})
    return pl.DataFrame(rows, schema={"base": pl.String, "chat": pl.String, "layer": pl.Int64, "position": pl.Int64,
                                      "cosine": pl.Float64, "chat_selected": pl.Boolean})


def similarity_chart(similarity: pl.DataFrame) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (base, chat), grp in similarity.group_by(["base", "chat"], maintain_order=True):
        line = ax.plot(grp["layer"], grp["cosine"], marker=".", label=f"{base} vs {chat}")[0]
        picked = grp.filter(pl.col("chat_selected"))
        ax.plot(picked["layer"], picked["cosine"], marker="*", markersize=12, color=line.get_color())
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(base direction, chat direction)")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=7)
    ax.set_title("Base vs chat refusal directions (star: the chat model's layer)")
    fig.tight_layout()
    return to_png(fig)


def run(experiment: str, score_paths: list[str], out_dir: str, charts: dict[str, str],
        selections: dict[str, tuple[str, str]] | None = None, capability_paths: list[str] = (),
        sweeps: dict[str, tuple[str, str, str]] | None = None, scatter_path: str | None = None,
        coherence: dict | None = None, pairs: list[tuple[str, str]] = (), candidates: dict[str, str] | None = None,
        similarity_path: str | None = None) -> None:
    scores = pl.concat([pl.from_arrow(read_parquet(p)) for p in score_paths], how="vertical")
    capability = pl.concat([pl.from_arrow(read_parquet(p)) for p in capability_paths], how="vertical") \
        if capability_paths else None
    summary = summarize(scores, coherence)
    if capability is not None and capability.height:
        per_cell = capability.pivot(on="metric", index=CELL, values="value")
        summary = summary.join(per_cell, on=CELL, how="left", maintain_order="left")
    out = Path(out_dir)
    write_parquet(summary.to_arrow(), out / "summary.parquet")
    wide = wide_table(summary, capability)
    buf = io.StringIO()
    wide.write_csv(buf)
    write_text(buf.getvalue(), out / "summary.csv")
    grid = wide.filter(pl.col("source") != "sweep")
    table_md = markdown(grid.drop("source", "cell"))  # the condition names them for readers
    write_text(markdown(wide.drop("source", "cell")), out / "summary.md")
    chart_links = []
    for model, path in charts.items():
        write_bytes(bar_chart(grid, model), path)
        chart_links.append(f"![{model}]({Path(path).relative_to(out)})")
    report = [f"# Refusal-direction experiment: {experiment}", "",
              f"Scorer: `{scores['scorer'][0]}`. Refusal rate on the held-out test prompts "
              "(harmful and harmless) per model and condition. Coherence: `repetition` = fraction of repeated "
              "token 3-grams, `nll_increase` = the unsteered model's loss on the completions minus its loss on "
              "its own baseline completions (nats/token); `degenerate` flags cells past the thresholds "
              f"({coherence or {}}). Capability side effects, on harmless prompts: "
              "`ce_reference` = cross-entropy (nats/token) on reference answers, `ce_own` = on the model's own "
              "baseline answers, `first_token_kl` = KL(baseline || steered) of the next-token distribution.",
              "", table_md, *chart_links, ""]
    transfer = transfer_table(summary)
    if transfer.height:
        report += ["## Base ↔ chat transfer", "",
                   "Refusal rate of each model of a declared pair with its own direction and with its partner's, "
                   "under the same intervention.", "", markdown(transfer), ""]
    if pairs and similarity_path:
        similarity = direction_similarity(list(pairs), candidates or {}, selections or {})
        write_bytes(similarity_chart(similarity), similarity_path)
        report += ["### How alike are the base and chat directions?", "",
                   "Cosine similarity of the two models' mean-difference directions at each layer (the chat "
                   "model's selected position); the transfer claim rests on it.", "",
                   markdown(similarity.with_columns(pl.col("cosine").round(3))),
                   f"![direction similarity]({Path(similarity_path).relative_to(out)})", ""]
    report += ["## Direction selection", "",
               *(selection_section(m, sp, hp, out) for m, (sp, hp) in (selections or {}).items())]
    if sweeps:
        tables = {m: (pl.read_parquet(sp), pl.read_parquet(pp), hp) for m, (sp, pp, hp) in sweeps.items()}
        report += ["## Sweep: where to extract, where to add, how much", "",
                   "Logit refusal score (log-odds of the refusal tokens at the last prompt position) of each "
                   "cell on the val prompts, then generated completions for the picked cells.", ""]
        report += [sweep_section(m, sw, pk, hp, wide, out) for m, (sw, pk, hp) in tables.items()]
        points = sweep_prediction(summary, pl.concat([sw for sw, _, _ in tables.values()], how="vertical"))
        if scatter_path:
            write_bytes(prediction_scatter(points), scatter_path)
            report += ["### Does the logit score predict generated refusal?", "",
                       markdown(correlations(points).with_columns(pl.col("pearson", "spearman").round(2))),
                       f"![prediction]({Path(scatter_path).relative_to(out)})", ""]
    report += ["## Example completions", "", examples(scores)]
    write_text("\n".join(report), out / "report.md")
