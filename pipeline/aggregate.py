"""Stage 6: collect every scored cell into one summary, tables, charts and a report."""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from .schemas import read_parquet, write_bytes, write_parquet, write_text

GROUP = ["model", "template", "source", "direction_model", "layer", "position", "intervention",
         "coefficient", "normalized", "scorer", "label"]


def condition_name(intervention: str, source: str, coefficient: float | None) -> str:
    if intervention == "baseline":
        return "baseline"
    if intervention in ("ablation", "orthogonalization"):
        return f"{intervention} ({source})"
    return f"addition {coefficient:+g} ({source})"


def summarize(scores: pl.DataFrame) -> pl.DataFrame:
    summary = (scores.group_by(GROUP)
               .agg(n=pl.len(), refused=pl.col("refused").sum(), refusal_rate=pl.col("refused").mean())
               .with_columns(condition=pl.struct("intervention", "source", "coefficient").map_elements(
                   lambda r: condition_name(r["intervention"], r["source"], r["coefficient"]),
                   return_dtype=pl.String)))
    order = {"baseline": 0, "ablation": 1, "orthogonalization": 2, "addition": 3}
    return summary.with_columns(_o=pl.col("intervention").replace_strict(order, return_dtype=pl.Int8)).sort(
        ["model", "_o", "source", "coefficient", "label"], nulls_last=False).drop("_o")


def wide_table(summary: pl.DataFrame, capability: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per model x condition: harmful and harmless refusal rates, then capability metrics."""
    wide = (summary.select("model", "condition", "layer", "label", "refusal_rate", "n")
            .pivot(on="label", index=["model", "condition", "layer"], values="refusal_rate",
                   maintain_order=True)
            .select("model", "condition", "layer", pl.col("harmful").round(3), pl.col("harmless").round(3)))
    if capability is None or capability.height == 0:
        return wide
    metrics = (capability.with_columns(condition=pl.struct("intervention", "source", "coefficient").map_elements(
                   lambda r: condition_name(r["intervention"], r["source"], r["coefficient"]), return_dtype=pl.String))
               .pivot(on="metric", index=["model", "condition"], values="value")
               .with_columns(pl.exclude("model", "condition").round(3)))
    return wide.join(metrics, on=["model", "condition"], how="left", maintain_order="left")


def markdown(df: pl.DataFrame) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(wide: pl.DataFrame, model: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def examples(scores: pl.DataFrame, per_condition: int = 2) -> str:
    lines = []
    for (model, intervention, source, coef, label), grp in scores.group_by(
            ["model", "intervention", "source", "coefficient", "label"], maintain_order=True):
        name = condition_name(intervention, source, coef)
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


def transfer_table(summary: pl.DataFrame) -> pl.DataFrame:
    """Base <-> chat transfer: each model's refusal rate with its own vs its pair partner's direction."""
    key = ["model", "intervention", "coefficient", "label"]
    rate = summary.select(*key, "source", "refusal_rate")
    partner = rate.filter(~pl.col("source").is_in(["none", "self", "random"])).rename(
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


def run(experiment: str, score_paths: list[str], out_dir: str, charts: dict[str, str],
        selections: dict[str, tuple[str, str]] | None = None, capability_paths: list[str] = ()) -> None:
    scores = pl.concat([pl.from_arrow(read_parquet(p)) for p in score_paths], how="vertical")
    capability = pl.concat([pl.from_arrow(read_parquet(p)) for p in capability_paths], how="vertical") \
        if capability_paths else None
    summary = summarize(scores)
    if capability is not None and capability.height:
        per_cell = capability.pivot(on="metric", index=["model", "source", "intervention", "coefficient"],
                                    values="value")
        summary = summary.join(per_cell, on=["model", "source", "intervention", "coefficient"], how="left",
                               nulls_equal=True, maintain_order="left")
    out = Path(out_dir)
    write_parquet(summary.to_arrow(), out / "summary.parquet")
    wide = wide_table(summary, capability)
    buf = io.StringIO()
    wide.write_csv(buf)
    write_text(buf.getvalue(), out / "summary.csv")
    table_md = markdown(wide)
    write_text(table_md, out / "summary.md")
    chart_links = []
    for model, path in charts.items():
        write_bytes(bar_chart(wide, model), path)
        chart_links.append(f"![{model}]({Path(path).relative_to(out)})")
    report = [f"# Refusal-direction experiment: {experiment}", "",
              f"Scorer: `{scores['scorer'][0]}`. Refusal rate on the held-out test prompts "
              "(harmful and harmless) per model and condition. Capability side effects, on harmless prompts: "
              "`ce_reference` = cross-entropy (nats/token) on reference answers, `ce_own` = on the model's own "
              "baseline answers, `first_token_kl` = KL(baseline || steered) of the next-token distribution.",
              "", table_md, *chart_links, ""]
    transfer = transfer_table(summary)
    if transfer.height:
        report += ["## Base ↔ chat transfer", "",
                   "Refusal rate of each model of a declared pair with its own direction and with its partner's, "
                   "under the same intervention.", "", markdown(transfer), ""]
    report += ["## Direction selection", "",
              *(selection_section(m, sp, hp, out) for m, (sp, hp) in (selections or {}).items()),
              "## Example completions", "", examples(scores)]
    write_text("\n".join(report), out / "report.md")
