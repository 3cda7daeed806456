"""Stage 6: collect every scored cell into one summary, tables, charts and a report.

Every refusal rate carries its 95% Wilson interval (`ci_low`, `ci_high`) and, for a steered
cell, the exact McNemar p-value against the same model's baseline on the same prompts and scorer.
With several scorers (`scoring: [...]`) every rate is per scorer: the tables carry a `scorer`
column (a cell's scorers on consecutive rows), the bar charts one panel per scorer, and the views
that need a single one (the sweep's score-vs-rate correlation) use the first listed and say so.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import polars as pl

from . import methods_table, stats
from .figures import interval_errors, pyplot, to_png
from .coherence import degenerate_cells
from .direction_methods import method_of, method_settings_of, methods_label
from .schemas import column_matrix, read_parquet, summary_schema, write_bytes, write_parquet, write_text
from .specs import PICKED_SOURCES, is_partner_source, source_method
from .interventions import INTERVENTIONS

GROUP = ["model", "template", "source", "cell", "direction_model", "extraction_layer", "extraction_position",
         "intervention", "addition_layer", "coefficient", "normalized", "ablation_layers", "scorer", "label"]
CELL = ["model", "source", "cell"]  # a generated cell: cell is its file name (baseline, addition_2, best1, ...)


def condition_name(intervention: str, source: str, coefficient: float | None) -> str:
    """The kind's own wording (its label, coefficient and source); a kind no longer registered (a summary
    from a plugin not loaded) by its name."""
    if intervention in INTERVENTIONS:
        return INTERVENTIONS.get(intervention).condition(source, coefficient)
    return f"{intervention} ({source})"


def kind_order() -> dict[str, int]:
    """The report's order of kinds: their registration order (built-ins first, then plugins)."""
    return {name: i for i, name in enumerate(INTERVENTIONS.names())}


PICKED_ON_VAL = ("best", "same", "spread", "ablate")  # sweep picks chosen by their val logit score


def picked_on(source: str, cell: str) -> str | None:
    """'val' for a sweep cell chosen by its logit score on the val prompts, or a selection rule's pick;
    declared sweep cells were not chosen."""
    if source in PICKED_SOURCES:  # a selection rule or the optimize study chose it from val scores
        return "val"
    if source != "sweep":
        return None
    return "val" if re.sub(r"\d+$", "", cell) in PICKED_ON_VAL else None


def cell_condition(r: dict) -> str:
    """A readable name: sweep picks carry their layers (and say when they were picked on val), a selection
    rule's pick its rule and layer, grid cells their direction source."""
    if r["source"] == "rule":
        return f"{r['cell']}'s pick: ablation L{r['extraction_layer']} pos {r['extraction_position']} (picked on val)"
    if r["source"] == "optimize":
        return f"{r['cell']} of the optimize study: {r['intervention']} (picked on val)"
    method = source_method(r["source"])
    if method:  # another direction method's direction, where the selected one was taken
        return condition_name(r["intervention"], f"{method} direction", r["coefficient"])
    if r["source"] != "sweep":
        return condition_name(r["intervention"], r["source"], r["coefficient"])
    if r["intervention"] == "ablation":
        name = f"{r['cell']}: ablation L{r['extraction_layer']}"
    else:
        name = f"{r['cell']}: addition {r['coefficient']:+g} L{r['extraction_layer']}→{r['addition_layer']}"
    return name + (" (picked on val)" if picked_on(r["source"], r["cell"]) else "")


def with_intervals(summary: pl.DataFrame) -> pl.DataFrame:
    """The 95% Wilson interval of each row's refusal rate."""
    bounds = [stats.wilson_interval(k, n) for k, n in zip(summary["refused"], summary["n"])]
    return summary.with_columns(ci_low=pl.Series([b[0] for b in bounds], dtype=pl.Float64),
                                ci_high=pl.Series([b[1] for b in bounds], dtype=pl.Float64))


def baseline_p_values(scores: pl.DataFrame) -> pl.DataFrame:
    """Per cell and label: the exact McNemar p-value against the same model's baseline, paired on prompt_id.

    Null for the baseline itself, and where the cell's prompts are not exactly the baseline's
    (the test needs both outcomes of every prompt).
    """
    keys = [*CELL, "scorer", "label"]
    per_cell = scores.group_by([*keys, "intervention"], maintain_order=True).agg("prompt_id", "refused")
    baseline = {(r["model"], r["scorer"], r["label"]): dict(zip(r["prompt_id"], r["refused"]))
                for r in per_cell.filter(pl.col("intervention") == "baseline").iter_rows(named=True)}
    rows = []
    for r in per_cell.iter_rows(named=True):
        before = baseline.get((r["model"], r["scorer"], r["label"]))
        p = None
        if r["intervention"] != "baseline" and before is not None:
            p = stats.paired_mcnemar(before, dict(zip(r["prompt_id"], r["refused"])))
        rows.append({**{k: r[k] for k in keys}, "p_value": p})
    return pl.DataFrame(rows, schema={**{k: pl.String for k in keys}, "p_value": pl.Float64})


def scorer_order(scores: pl.DataFrame, scorers: list[str] | None = None) -> list[str]:
    """The scorers as the experiment lists them (`scorers`), else in order of appearance; any not listed last."""
    seen = scores["scorer"].unique(maintain_order=True).to_list()
    listed = [s for s in (scorers or []) if s in seen]
    return listed + [s for s in seen if s not in listed]


def summarize(scores: pl.DataFrame, coherence: dict | None = None, scorers: list[str] | None = None) -> pl.DataFrame:
    """One row per model x cell x scorer x label: refused / n, rate, Wilson interval, McNemar p vs baseline,
    coherence. `scorers`: their order in the table (default: as they appear in `scores`)."""
    summary = (scores.group_by(GROUP)
               .agg(n=pl.len(), refused=pl.col("refused").sum(), refusal_rate=pl.col("refused").mean(),
                    repetition=pl.col("repetition").mean(), nll=pl.col("nll").fill_nan(None).mean())
               .with_columns(condition=pl.struct("source", "cell", "intervention", "coefficient", "extraction_layer",
                                                 "extraction_position", "addition_layer").map_elements(cell_condition,
                                                                                return_dtype=pl.String),
                             picked_on=pl.struct("source", "cell").map_elements(
                                 lambda r: picked_on(r["source"], r["cell"]), return_dtype=pl.String)))
    summary = with_intervals(summary).join(baseline_p_values(scores), on=[*CELL, "scorer", "label"], how="left")
    base_nll = (summary.filter(pl.col("intervention") == "baseline")
                .select("model", "scorer", "label", pl.col("nll").alias("_base_nll")))
    summary = summary.join(base_nll, on=["model", "scorer", "label"], how="left").with_columns(
        nll_increase=pl.col("nll") - pl.col("_base_nll")).drop("_base_nll")
    summary = summary.join(degenerate_cells(scores, GROUP, coherence).drop("broken_share"), on=GROUP, how="left",
                           nulls_equal=True)
    ranks = {name: i for i, name in enumerate(scorer_order(scores, scorers))}
    return summary.with_columns(_o=pl.col("intervention").replace_strict(kind_order(), default=len(kind_order()),
                                                                              return_dtype=pl.Int16),
                                # the grid, the selection rules' picks, the optimize study's trials, the sweep's
                                _s=pl.col("source").replace_strict({"rule": 1, "optimize": 2, "sweep": 3}, default=0,
                                                                   return_dtype=pl.Int8),
                                _r=pl.col("scorer").replace_strict(ranks, return_dtype=pl.Int32)).sort(
        ["model", "_s", "_o", "source", "coefficient", "cell", "_r", "label"], nulls_last=False).drop("_o", "_s", "_r")


LABELS = ("harmful", "harmless")
RATE_STATS = {"refusal_rate": "", "ci_low": "_ci_low", "ci_high": "_ci_high", "refused": "_refused", "n": "_n",
              "p_value": "_p"}  # summary column -> suffix of the wide table's per-label column
WIDE_INDEX = [*CELL, "condition", "scorer", "intervention", "extraction_layer", "addition_layer"]


def wide_table(summary: pl.DataFrame, capability: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per model x generated cell x scorer: per label its rate (column `harmful`, `harmless`), Wilson
    bounds, counts and McNemar p (`harmful_ci_low`, ..., `harmless_p`); then coherence and capability metrics
    (the cell's, the same for each of its scorers)."""
    wide = summary.select(WIDE_INDEX).unique(maintain_order=True)
    for label in LABELS:
        part = summary.filter(pl.col("label") == label).select(
            *CELL, "scorer", *[pl.col(c).alias(label + suffix) for c, suffix in RATE_STATS.items()])
        wide = wide.join(part, on=[*CELL, "scorer"], how="left", maintain_order="left")
    coherent = (summary.group_by(CELL, maintain_order=True)
                .agg(repetition=pl.col("repetition").mean(), nll_increase=pl.col("nll_increase").mean(),
                     degenerate=pl.col("degenerate").any()))
    wide = wide.join(coherent.with_columns(pl.col("repetition", "nll_increase").round(3)), on=CELL,
                     how="left", maintain_order="left")
    if capability is not None and capability.height:
        metrics = (capability.pivot(on="metric", index=CELL, values="value")
                   .with_columns(pl.exclude(CELL).round(3)))
        wide = wide.join(metrics, on=CELL, how="left", maintain_order="left")
    return wide


def rate_text(rate: float | None, low: float | None, high: float | None, refused: int | None,
              n: int | None) -> str:
    """'0.56 [0.39, 0.72] (18/32)': rate, 95% Wilson interval, count."""
    if rate is None:
        return ""
    return f"{rate:.2f} [{low:.2f}, {high:.2f}] ({refused}/{n})"


def p_text(p: float | None, intervention: str) -> str:
    if intervention == "baseline":
        return ""
    if p is None:
        return "n/a"  # the cell's prompts are not the baseline's: nothing to pair
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def label_text(label: str) -> list[pl.Expr]:
    """A label's rate as 'rate [low, high] (k/n)', and its McNemar p-value beside it (blank where not generated)."""
    parts = [label + suffix for suffix in ("", "_ci_low", "_ci_high", "_refused", "_n")]
    rate = pl.struct(*parts).map_elements(lambda r: rate_text(*(r[c] for c in parts)), return_dtype=pl.String)
    p = pl.struct(f"{label}_p", f"{label}_n", "intervention").map_elements(
        lambda r: "" if r[f"{label}_n"] is None else p_text(r[f"{label}_p"], r["intervention"]),
        return_dtype=pl.String)
    return [rate.alias(label), p.alias(f"{label} p")]


def display_table(wide: pl.DataFrame) -> pl.DataFrame:
    """The wide table for Markdown: per label 'rate [low, high] (k/n)' and 'p' vs baseline, then the rest."""
    per_label = {label + suffix for label in LABELS for suffix in RATE_STATS.values()}
    rest = [c for c in wide.columns if c not in per_label and c not in WIDE_INDEX]
    return wide.select(*CELL, "condition", "scorer", "extraction_layer", "addition_layer",
                       *[e for label in LABELS for e in label_text(label)], *rest)


def markdown(df: pl.DataFrame) -> str:
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(wide: pl.DataFrame, model: str) -> bytes:
    """Harmful vs harmless refusal rate per condition, with 95% Wilson intervals as error bars: one panel per
    scorer, each titled with its scorer (never two scorers' rates in one panel)."""
    plt = pyplot()

    rows = wide.filter(pl.col("model") == model)
    panels = rows["scorer"].unique(maintain_order=True).to_list()
    width = max(6, 0.9 * rows.filter(pl.col("scorer") == panels[0]).height + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 4 * len(panels)), squeeze=False)
    w = 0.4
    for ax, scorer in zip(axes[:, 0], panels):
        part = rows.filter(pl.col("scorer") == scorer)
        names = part["condition"].to_list()
        x = np.arange(len(names))
        for offset, label, color in ((-w / 2, "harmful", "#c0392b"), (w / 2, "harmless", "#2e86c1")):
            rate = part[label].fill_null(0).to_numpy()
            errors = interval_errors(rate, part[f"{label}_ci_low"].to_numpy(), part[f"{label}_ci_high"].to_numpy())
            ax.bar(x + offset, rate, w, yerr=errors, capsize=3, error_kw={"elinewidth": 0.8}, label=label,
                   color=color)
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate (95% Wilson interval)")
        ax.set_title(f"{model}: refusal rate by condition (scorer {scorer})")
        ax.legend(loc="upper left")
    fig.tight_layout()
    return to_png(fig, dpi=110)


def examples(scores: pl.DataFrame, per_condition: int = 2) -> str:
    lines = []
    for (model, source, cell, label), grp in scores.group_by(["model", "source", "cell", "label"],
                                                              maintain_order=True):
        name = cell_condition(grp.row(0, named=True))
        # the completions, once each (a cell scored by several scorers has one row per scorer)
        for r in grp.unique("prompt_id", keep="first", maintain_order=True).head(per_condition).iter_rows(named=True):
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
        lines += ["", rule_picks(sel)]
        best = (evaluated.sort("bypass").head(5)
                .select("layer", "position", "bypass", "induce", "kl", "cosmic", "picks", "discarded"))
        lines += ["", markdown(best.with_columns(pl.col("bypass", "induce", "cosmic").round(2), pl.col("kl").round(3)))]
    lines += ["", f"![{model} selection]({Path(heatmap_path).relative_to(out)})", ""]
    return "\n".join(lines)


RULE_NAMES = {"auto": "Arditi et al.'s rule (lowest bypass score)", "cosmic": "COSMIC (highest cosine score)"}


def rule_picks(sel: pl.DataFrame) -> str:
    """Which candidate each selection rule picks: both are scored in the same passes, whichever one chose."""
    rule = sel.filter(pl.col("chosen"))["rule"][0]
    said = [f"Chosen by {RULE_NAMES.get(rule, rule)}."]
    for name, text in RULE_NAMES.items():
        picked = sel.filter(pl.col("picks").str.split(",").list.contains(name))
        if picked.height:
            r = picked.row(0, named=True)
            said.append(f"{text}: layer {r['layer']}, position {r['position']} (bypass {r['bypass']:.2f}, "
                        f"COSMIC score {r['cosmic']:.3f}, KL {r['kl']:.3f}).")
        else:
            said.append(f"{text}: no candidate passes its filters.")
    compared = sorted({n for ps in sel["picks"].drop_nulls() for n in ps.split(",") if n not in RULE_NAMES})
    if compared:  # direction.selection.kl_max_compare: the same rules under other KL caps
        where = {n: r for r in sel.filter(pl.col("picks").is_not_null()).iter_rows(named=True)
                 for n in r["picks"].split(",")}
        said.append("Under the compared KL caps: " + "; ".join(
            f"{n}: layer {where[n]['layer']}, position {where[n]['position']}" for n in compared) + ".")
    return " ".join(said)


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
    # one point per distinct cell: a grid cell and a sweep pick with the same axes generate the same
    # greedy text on the same prompts, so the first one's counts stand for both (pooling would double n)
    return (joined.group_by(PREDICTION_KEYS, maintain_order=True)
            .agg(pl.col("condition", "cell", "logit_score", "refusal_rate", "refused", "n", "ci_low",
                        "ci_high").first(), pl.col("degenerate").any())
            .sort("model", "kind", "logit_score"))


CORRELATION_SCHEMA = {"model": pl.String, "kind": pl.String, "cells": pl.Int64, "pearson": pl.Float64,
                      "pearson_low": pl.Float64, "pearson_high": pl.Float64, "spearman": pl.Float64,
                      "spearman_low": pl.Float64, "spearman_high": pl.Float64, "note": pl.String}


def correlations(points: pl.DataFrame, min_cells: int = stats.MIN_CORRELATION_POINTS) -> pl.DataFrame:
    """Pearson and Spearman correlation of val logit score vs test refusal rate, with 95% Fisher-z intervals,
    per model and kind; not estimated below `min_cells` generated cells (`note` says why)."""
    rows = []
    for (model, kind), grp in points.group_by(["model", "kind"], maintain_order=True):
        row = {"model": model, "kind": kind, "cells": grp.height}
        x, y = grp["logit_score"].to_numpy(), grp["refusal_rate"].to_numpy()
        if grp.height < min_cells:
            row["note"] = (f"not estimated: {grp.height} generated cell{'s' * (grp.height != 1)}, "
                           f"fewer than {min_cells}")
        else:
            for method in ("pearson", "spearman"):
                estimate = stats.correlation_interval(x, y, method)
                if estimate is None:
                    row["note"] = "not estimated: the score or the rate is constant"
                    continue
                row[method], row[f"{method}_low"], row[f"{method}_high"] = estimate
        rows.append(row)
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def correlation_text(corr: pl.DataFrame) -> pl.DataFrame:
    """For the report: 'r [low, high]', or the reason it was not estimated."""
    def cell(r: dict, method: str) -> str:
        if r[method] is None:
            return ""
        return f"{r[method]:.2f} [{r[f'{method}_low']:.2f}, {r[f'{method}_high']:.2f}]"

    return corr.select("model", "kind", "cells",
                       *[pl.struct(pl.all()).map_elements(lambda r, m=m: cell(r, m), return_dtype=pl.String).alias(m)
                         for m in ("pearson", "spearman")], pl.col("note").fill_null(""))


def prediction_scatter(points: pl.DataFrame, scorer: str | None = None) -> bytes:
    """Val logit score vs test refusal rate per generated cell, the rate with its 95% Wilson interval
    (`scorer`: whose rates they are, named in the titles)."""
    plt = pyplot()

    kinds = ["addition", "ablation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, kind in zip(axes, kinds):
        sub = points.filter(pl.col("kind") == kind)
        for model, grp in sub.group_by("model", maintain_order=True):
            color = None
            for degenerate, marker, suffix in ((False, "o", ""), (True, "x", " (degenerate)")):
                part = grp.filter(pl.col("degenerate") == degenerate)
                if not part.height:
                    continue
                rate = part["refusal_rate"].to_numpy()
                bars = ax.errorbar(part["logit_score"].to_numpy(), rate, capsize=3, linestyle="none", marker=marker,
                                   yerr=interval_errors(rate, part["ci_low"].to_numpy(), part["ci_high"].to_numpy()),
                                   color=color, label=model[0] + suffix)
                color = bars.lines[0].get_color()
            for r in grp.iter_rows(named=True):
                ax.annotate(r["cell"], (r["logit_score"], r["refusal_rate"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        label = "harmless" if kind == "addition" else "harmful"
        ax.set_xlabel(f"logit refusal score ({label} val prompts, mean)")
        ax.set_ylabel(f"generated refusal rate ({label} test prompts, 95% CI)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{kind}: does the cheap score predict generation?"
                     + (f"\n(refusal by scorer {scorer})" if scorer else ""), fontsize=9)
        if sub.height:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return to_png(fig)


def outcomes(scores: pl.DataFrame, model: str, source: str, cell: str, label: str,
             scorer: str | None = None) -> dict[str, bool]:
    """prompt_id -> refused, for one generated cell and label (and scorer: required when the scores hold several)."""
    rows = scores.filter((pl.col("model") == model) & (pl.col("source") == source) & (pl.col("cell") == cell)
                         & (pl.col("label") == label))
    if scorer is not None:
        rows = rows.filter(pl.col("scorer") == scorer)
    elif rows["scorer"].n_unique() > 1:
        raise ValueError(f"{model}/{source}/{cell}: scored by several scorers; name one")
    return dict(zip(rows["prompt_id"], rows["refused"]))


def sweep_section(model: str, sweep: pl.DataFrame, picks: pl.DataFrame, heatmap_path: str, wide: pl.DataFrame,
                  shown: pl.DataFrame, scores: pl.DataFrame, out: Path) -> str:
    """`wide`: the numeric wide table; `shown`: the same rows as displayed (rates with their intervals);
    `scores`: per-prompt outcomes, to compare the best cell with its same-layer counterpart."""
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
    generated = shown.filter((pl.col("model") == model) & (pl.col("source") == "sweep"))
    if generated.height:
        lines += ["Generated sweep cells (test prompts; addition cells on harmless prompts, ablation on harmful). "
                  "`picked on val`: chosen by its logit score on the val prompts; its rate is measured on the "
                  "test prompts, which played no part in the pick. p: exact McNemar test against the baseline "
                  "on the same test prompts.", "",
                  markdown(generated.with_columns(pick=pl.col("cell"))
                           .join(picks.select("pick", pl.col("logit_score").round(2)), on="pick", how="left")
                           .select("condition", "scorer", "logit_score", "harmful", "harmful p", "harmless",
                                   "harmless p", "repetition", "nll_increase", "degenerate"))]
        swept = wide.filter((pl.col("model") == model) & (pl.col("source") == "sweep"))
        several = swept["scorer"].n_unique() > 1
        best = picks.filter(pl.col("pick") == "best1")
        for scorer in swept["scorer"].unique(maintain_order=True).to_list():
            rates = {r["cell"]: r for r in swept.filter(pl.col("scorer") == scorer).iter_rows(named=True)}
            if not (best.height and {"best1", "same1"} <= set(rates) and rates["best1"]["harmless"] is not None
                    and rates["same1"]["harmless"] is not None):
                continue
            b = best.row(0, named=True)
            text = {cell: rate_text(*(rates[cell]["harmless" + suffix]
                                      for suffix in ("", "_ci_low", "_ci_high", "_refused", "_n")))
                    for cell in ("best1", "same1")}
            pair = (outcomes(scores, model, "sweep", cell, "harmless", scorer) for cell in ("best1", "same1"))
            p = stats.paired_mcnemar(*pair)
            versus = ("not paired (other prompts)" if p is None
                      else "exact McNemar p " + ("< 0.001" if p < 0.001 else f"= {p_text(p, 'addition')}"))
            lines.append((f"Scorer `{scorer}`: " if several else "")
                         + f"Best cell, picked on val (the highest logit score of {added.height} addition cells), "
                         f"rate on test: direction from layer {b['extraction_layer']} added at layer "
                         f"{b['addition_layer']} (coefficient {b['coefficient']:g}) → harmless refusal "
                         f"{text['best1']}; the same direction added at its own layer → {text['same1']} "
                         f"(best vs same on the same test prompts: {versus}). The pick's val logit score is the "
                         "maximum of many and so optimistic; its test rate is measured on prompts the pick never "
                         "saw, but it is the rate of the one cell picked, not of the sweep's cells in general.")
            lines.append("")
    return "\n".join(lines)


def transfer_table(summary: pl.DataFrame, value: str = "refusal_rate") -> pl.DataFrame:
    """Base <-> chat transfer: each model's refusal rate with its own vs its pair partner's direction.

    `value`: the summary column shown for each rate (the report passes its 'rate [low, high]' text).
    """
    key = ["model", "intervention", "coefficient", "scorer", "label"]
    rate = summary.select(*key, "source", pl.col(value).alias("_rate"))
    partner = rate.filter(pl.col("source").map_elements(is_partner_source, return_dtype=pl.Boolean)).rename(
        {"source": "partner", "_rate": "partner_direction"})
    if partner.height == 0:
        return partner
    own = rate.filter(pl.col("source") == "self").drop("source").rename({"_rate": "own_direction"})
    base = (rate.filter(pl.col("intervention") == "baseline").select("model", "scorer", "label", "_rate")
            .rename({"_rate": "baseline"}))
    table = (partner.join(own, on=key, how="left", nulls_equal=True)
             .join(base, on=["model", "scorer", "label"], how="left")
             .with_columns(condition=pl.struct("intervention", "coefficient").map_elements(
                 lambda r: condition_name(r["intervention"], "", r["coefficient"]).replace(" ()", ""),
                 return_dtype=pl.String)))
    return (table.sort("model", "intervention", "coefficient", "scorer", "label", maintain_order=True)
            .select("model", "partner", "condition", "scorer", "label", "baseline", "own_direction",
                    "partner_direction"))


def activations_at(path: str, position: int) -> tuple[list[str], dict[str, np.ndarray], list[int]]:
    """One position's train activations: prompt ids per label, label -> [prompts, layers, d], layers."""
    table = pl.from_arrow(read_parquet(path).select(["prompt_id", "label", "layer", "position", "act"]))
    table = table.filter(pl.col("position") == position).sort("label", "prompt_id", "layer")
    layers = table["layer"].unique().sort().to_list()
    acts, ids = {}, {}
    for label in LABELS:
        rows = table.filter(pl.col("label") == label)
        ids[label] = rows["prompt_id"].unique(maintain_order=True).to_list()
        acts[label] = rows["act"].to_numpy().reshape(len(ids[label]), len(layers), -1)
    return ids, acts, layers


def similarity_se(base_acts: str, chat_acts: str, position: int, layers: list[int],
                  method: str, settings: dict | None = None) -> dict[int, float] | None:
    """Bootstrap standard error of the base/chat cosine per layer, directions by `method` with `settings` (the
    candidates');
    None if the models saw different prompts."""
    (base_ids, base, base_layers), (chat_ids, chat, chat_layers) = (activations_at(p, position)
                                                                    for p in (base_acts, chat_acts))
    if base_ids != chat_ids:
        return None
    pick = {m: [have.index(layer) for layer in layers] for m, have in (("base", base_layers), ("chat", chat_layers))}
    se = stats.bootstrap_cosine_se({k: v[:, pick["base"]] for k, v in base.items()},
                                   {k: v[:, pick["chat"]] for k, v in chat.items()}, method=method,
                                   settings=settings)
    return dict(zip(layers, se.tolist()))


def direction_similarity(pairs: list[tuple[str, str]], candidates: dict[str, str],
                         selections: dict[str, tuple[str, str]], activations: dict[str, str] | None = None
                         ) -> pl.DataFrame:
    """Per declared pair and layer: cosine similarity of the base and chat candidate directions.

    Both are taken at the chat model's selected position (the last template token in the
    base-models experiments); the base <-> chat transfer claim rests on these being close.
    With `activations` (model -> its train activations, unfiltered prompts), each cosine gets a
    95% interval: estimate +- 1.96 bootstrap standard errors over the train prompts.
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
        layers = sorted(set(vectors[base]) & set(vectors[chat]))
        se = None
        if activations and base in activations and chat in activations:
            se = similarity_se(activations[base], activations[chat], chosen["position"], layers,
                               method_of(tables[chat]), method_settings_of(tables[chat]))
        for layer in layers:
            cosine = float(stats.cosine_rows(vectors[base][layer], vectors[chat][layer]))
            low = high = None
            if se is not None:
                low, high = (float(v) for v in stats.normal_interval(cosine, se[layer]))
            rows.append({"base": base, "chat": chat, "layer": layer, "position": chosen["position"],
                         "cosine": cosine, "ci_low": low, "ci_high": high, "chat_selected": layer == chosen["layer"]})
    return pl.DataFrame(rows, schema={"base": pl.String, "chat": pl.String, "layer": pl.Int64, "position": pl.Int64,
                                      "cosine": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                      "chat_selected": pl.Boolean})


def similarity_chart(similarity: pl.DataFrame) -> bytes:
    """Cosine per layer; the shaded band is its 95% bootstrap interval where one was computed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (base, chat), grp in similarity.group_by(["base", "chat"], maintain_order=True):
        line = ax.plot(grp["layer"], grp["cosine"], marker=".", label=f"{base} vs {chat}")[0]
        if grp["ci_low"].is_not_null().all():
            ax.fill_between(grp["layer"].to_numpy(), grp["ci_low"].to_numpy(), grp["ci_high"].to_numpy(),
                            color=line.get_color(), alpha=0.2, linewidth=0)
        picked = grp.filter(pl.col("chat_selected"))
        ax.plot(picked["layer"], picked["cosine"], marker="*", markersize=12, color=line.get_color())
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine(base direction, chat direction)")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=7)
    ax.set_title("Base vs chat refusal directions (star: the chat model's layer; band: 95% CI)", fontsize=9)
    fig.tight_layout()
    return to_png(fig)


def statistics_note(summary: pl.DataFrame) -> str:
    """What the intervals and p-values in the tables are, and how many tests the table holds."""
    tests = summary["p_value"].is_not_null().sum()
    unpaired = summary.filter((pl.col("intervention") != "baseline") & pl.col("p_value").is_null()).height
    return ("Each refusal rate is shown as `rate [low, high] (refused/n)`: the 95% Wilson score interval of "
            "the proportion over the n test prompts. `p`: two-sided exact McNemar test of the cell against the "
            "same model's baseline on the same prompts and by the same scorer (paired on the prompt; binomial test "
            "on the prompts whose "
            f"outcome changed); {tests} such tests in all, not corrected for multiple comparisons. "
            + (f"`n/a` ({unpaired} rows): the cell was generated on other prompts than the baseline, so there is "
               "nothing to pair. " if unpaired else "")
            + "Cells marked `picked on val` were chosen by their logit score on the val prompts; their rates are "
            "measured on the test prompts.")


def run(experiment: str, score_paths: list[str], out_dir: str, charts: dict[str, str],
        selections: dict[str, tuple[str, str]] | None = None, capability_paths: list[str] = (),
        sweeps: dict[str, tuple[str, str, str]] | None = None, scatter_path: str | None = None,
        coherence: dict | None = None, pairs: list[tuple[str, str]] = (), candidates: dict[str, str] | None = None,
        similarity_path: str | None = None, activations: dict[str, str] | None = None,
        scorers: list[str] | None = None, methods_charts: dict[str, str] | None = None) -> None:
    """`methods_charts`: model -> its methods Pareto chart (methods.parquet/.csv are written with the summary).
    `activations`: train activations of the paired models, for the similarity's bootstrap interval
    (omit when the directions were computed over filtered prompts: the bootstrap would resample others).
    `scorers`: the experiment's scorers as listed (table order; the first is the one single-scorer views use)."""
    scores = pl.concat([pl.from_arrow(read_parquet(p)) for p in score_paths], how="vertical")
    capability = pl.concat([pl.from_arrow(read_parquet(p)) for p in capability_paths], how="vertical") \
        if capability_paths else None
    scorers = scorer_order(scores, scorers)
    summary = summarize(scores, coherence, scorers)
    metrics = []
    if capability is not None and capability.height:
        per_cell = capability.pivot(on="metric", index=CELL, values="value")
        metrics = [c for c in per_cell.columns if c not in CELL]
        summary = summary.join(per_cell, on=CELL, how="left", maintain_order="left")
    out = Path(out_dir)
    schema = summary_schema(metrics)
    summary = pl.from_arrow(summary.select(schema.names).to_arrow().cast(schema))
    write_parquet(summary.to_arrow(), out / "summary.parquet", nan_ok=())  # no NaN reaches a summary
    buf = io.StringIO()
    summary.write_csv(buf)
    write_text(buf.getvalue(), out / "summary.csv")
    methods = methods_table.run(summary, scores, out, methods_charts or {})
    wide = wide_table(summary, capability)
    shown = display_table(wide)
    grid = wide.filter(pl.col("source") != "sweep")
    table_md = markdown(shown.filter(pl.col("source") != "sweep").drop(*CELL[1:]))  # the condition names them
    write_text(statistics_note(summary) + "\n\n" + markdown(shown.drop(*CELL[1:])), out / "summary.md")
    chart_links = []
    for model, path in charts.items():
        write_bytes(bar_chart(grid, model), path)
        chart_links.append(f"![{model}]({Path(path).relative_to(out)})")
    scored_by = (f"Scorer: `{scorers[0]}`. " if len(scorers) == 1 else
                 "Scorers: " + ", ".join(f"`{s}`" for s in scorers) + " — every rate, interval and p-value is per "
                 "scorer (the `scorer` column; each cell's scorers on consecutive rows, one chart panel each). ")
    report = [f"# Refusal-direction experiment: {experiment}", "",
              scored_by + "Refusal rate on the held-out test prompts "
              "(harmful and harmless) per model and condition. " + statistics_note(summary) + " Coherence: "
              "`repetition` = fraction of repeated token 3-grams, `nll_increase` = the unsteered model's loss on "
              "the completions minus its loss on its own baseline completions (nats/token); `degenerate` flags "
              "cells whose share of broken completions (repetition, or the lower of the losses after the prompt "
              "and after a neutral instruction, past its threshold; "
              f"docs/measures.md) passes the limit ({coherence or {}}). Capability side effects, on harmless prompts: "
              "`ce_reference` = cross-entropy (nats/token) on reference answers, `ce_own` = on the model's own "
              "baseline answers, `first_token_kl` = KL(baseline || steered) of the next-token distribution, "
              "`kl_tokens` = the same averaged over the first answer positions, teacher-forced on the baseline's "
              "own answer. "
              "Error bars in the charts: the 95% Wilson intervals.",
              "", table_md, *chart_links, "", methods, ""]
    transfer = transfer_table(summary.with_columns(_text=pl.struct(
        "refusal_rate", "ci_low", "ci_high", "refused", "n").map_elements(
        lambda r: rate_text(r["refusal_rate"], r["ci_low"], r["ci_high"], r["refused"], r["n"]),
        return_dtype=pl.String)), value="_text")
    if transfer.height:
        report += ["## Base ↔ chat transfer", "",
                   "Refusal rate of each model of a declared pair with its own direction and with its partner's, "
                   "under the same intervention (95% Wilson intervals).", "", markdown(transfer), ""]
    if pairs and similarity_path:
        similarity = direction_similarity(list(pairs), candidates or {}, selections or {}, activations)
        write_bytes(similarity_chart(similarity), similarity_path)
        interval = ("`ci_low`/`ci_high`: estimate ± 1.96 bootstrap standard errors, resampling the train prompts "
                    "(1000 draws, the same draw for both models). Cosines of means over a few dozen prompts are "
                    "pulled toward 0 by sampling noise, so a true cosine near ±1 reads somewhat lower."
                    if similarity["ci_low"].is_not_null().any() else
                    "No interval: the directions are means over prompts filtered per model by their refusal "
                    "score (`direction.filter`), which a bootstrap over the shared train prompts would not "
                    "reproduce.")
        report += ["### How alike are the base and chat directions?", "",
                   f"Cosine similarity of the two models' directions ({methods_label(candidates or {})}) at each "
                   "layer (the chat "
                   "model's selected position); the transfer claim rests on it. " + interval, "",
                   markdown(similarity.with_columns(pl.col("cosine", "ci_low", "ci_high").round(3))),
                   f"![direction similarity]({Path(similarity_path).relative_to(out)})", ""]
    report += ["## Direction selection", "",
               "The heatmaps show mean logit scores over the val prompts; the stages keep only each candidate's "
               "mean, not its per-prompt scores, so they carry no interval.", "",
               *(selection_section(m, sp, hp, out) for m, (sp, hp) in (selections or {}).items())]
    if sweeps:
        tables = {m: (pl.read_parquet(sp), pl.read_parquet(pp), hp) for m, (sp, pp, hp) in sweeps.items()}
        report += ["## Sweep: where to extract, where to add, how much", "",
                   "Logit refusal score (log-odds of the refusal tokens at the last prompt position) of each "
                   "cell on the val prompts, then generated completions for the picked cells. The sweep keeps "
                   "each cell's mean score only, so the heatmaps and the scores carry no interval.", ""]
        report += [sweep_section(m, sw, pk, hp, wide, shown, scores, out) for m, (sw, pk, hp) in tables.items()]
        # one scorer's rates: the first listed (pooling scorers would count each cell twice)
        points = sweep_prediction(summary.filter(pl.col("scorer") == scorers[0]),
                                  pl.concat([sw for sw, _, _ in tables.values()], how="vertical"))
        if scatter_path:
            write_bytes(prediction_scatter(points, scorers[0]), scatter_path)
            report += ["### Does the logit score predict generated refusal?", "",
                       f"Correlation of the val logit score with the generated test refusal rate (scorer "
                       f"`{scorers[0]}`) over the generated "
                       f"cells the sweep also scored, with its 95% interval (Fisher z; for Spearman's rho the "
                       f"variance 1.06/(n-3) of Fieller et al.). It is estimated only from "
                       f"{stats.MIN_CORRELATION_POINTS} cells on: with fewer, the interval spans most of [-1, 1] "
                       "and a point estimate would claim more than the data show. The interval counts the cells "
                       "as the sample; each rate's own binomial noise (the error bars) widens it further.", "",
                       markdown(correlation_text(correlations(points))),
                       f"![prediction]({Path(scatter_path).relative_to(out)})", ""]
    report += ["## Example completions", "", examples(scores)]
    write_text("\n".join(report), out / "report.md")
