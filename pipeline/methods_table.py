"""The methods side by side: per model and scorer, one row per grid cell (intervention method).

Each row carries what a reader compares methods on: how often the harmful prompts are still refused
(rate, Wilson interval and the "k/N" headline count), how often harmless ones are (over-refusal), what
the steering costs on harmless prompts (first-token and multi-token KL from the unsteered model, loss on
reference answers), whether the completions degenerate, and the exact McNemar p-value against plain
`ablation` of the same direction source on the same harmful prompts (is the method any different from
the standard one?). The Pareto chart plots harmful refusal against KL: a method is Pareto-optimal when
no other has both less KL and less refusal.

Sweep cells are left out: they ran on one label only, so they have no harmful/harmless pair.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from . import stats
from .figures import interval_errors, pyplot, to_png
from .schemas import write_bytes, write_parquet, write_text
from .specs import reference_source

REFERENCE = "ablation"  # the method every other is tested against
KEYS = ["model", "scorer", "source", "cell"]
METRICS = ("first_token_kl", "kl_tokens", "ce_reference")  # capability columns shown (null where not measured)
LABEL_COLUMNS = {"refusal_rate": "_rate", "ci_low": "_ci_low", "ci_high": "_ci_high", "refused": "_refused",
                 "n": "_n"}  # summary column -> suffix of the methods table's per-label column


def reference_p_values(scores: pl.DataFrame, reference: str = REFERENCE) -> pl.DataFrame:
    """Per grid cell and scorer: exact McNemar p-value of its harmful-prompt outcomes against the `reference`
    cell of the same model, direction source and scorer (a selection rule's pick: the selected direction's),
    paired on prompt_id.

    Null for the reference itself, for a source without a reference cell (the baseline's `none`), and where
    the prompt sets differ."""
    harmful = scores.filter((pl.col("label") == "harmful") & (pl.col("source") != "sweep"))
    per_cell = harmful.group_by(KEYS, maintain_order=True).agg("prompt_id", "refused")
    ref = {(r["model"], r["scorer"], r["source"]): dict(zip(r["prompt_id"], r["refused"]))
           for r in per_cell.filter(pl.col("cell") == reference).iter_rows(named=True)}
    rows = []
    for r in per_cell.iter_rows(named=True):
        # a selection rule's pick (an ablation), an optimize study's trial (an edit of the selected direction) and
        # another direction method's cells are compared with the selected direction's ablation
        mine = reference_source(r["source"])
        before = ref.get((r["model"], r["scorer"], mine))
        p = None
        if (r["cell"], r["source"]) != (reference, mine) and before is not None:  # not the reference itself
            p = stats.paired_mcnemar(before, dict(zip(r["prompt_id"], r["refused"])))
        rows.append({**{k: r[k] for k in KEYS}, "p_vs_ablation": p})
    return pl.DataFrame(rows, schema={**{k: pl.String for k in KEYS}, "p_vs_ablation": pl.Float64})


def label_part(summary: pl.DataFrame, label: str) -> pl.DataFrame:
    """One label's rate, interval and counts per cell and scorer, as `<label>_rate`, `<label>_ci_low`, ..."""
    return summary.filter(pl.col("label") == label).select(
        *KEYS, *[pl.col(c).alias(label + suffix) for c, suffix in LABEL_COLUMNS.items()])


def methods_table(summary: pl.DataFrame, scores: pl.DataFrame, reference: str = REFERENCE) -> pl.DataFrame:
    """One row per model x scorer x grid cell, in the summary's order (see the module docstring).
    `summary`: aggregate's summary (per-label rows, capability metrics as columns, unrounded)."""
    grid = summary.filter(pl.col("source") != "sweep")
    cells = grid.select(*KEYS, "condition", "intervention").unique(maintain_order=True)
    table = cells
    for label in ("harmful", "harmless"):
        table = table.join(label_part(grid, label), on=KEYS, how="left", maintain_order="left")
    # a cell is degenerate when any of its labels is (as in the wide table)
    degenerate = grid.group_by(KEYS).agg(pl.col("degenerate").any())
    metrics = grid.select(*KEYS, *[pl.col(m) if m in grid.columns else pl.lit(None, pl.Float64).alias(m)
                                   for m in METRICS]).unique(KEYS, keep="first")
    table = (table.join(metrics, on=KEYS, how="left", maintain_order="left")
             .join(degenerate, on=KEYS, how="left", maintain_order="left")
             .join(reference_p_values(scores, reference), on=KEYS, how="left", maintain_order="left")
             .with_columns(harmful_refusals=pl.format("{}/{}", "harmful_refused", "harmful_n")))
    return with_pareto(table)


def kl_axis(table: pl.DataFrame) -> str:
    """The KL the Pareto front is taken on: kl_tokens where every row has it (it sees past the first
    token), else first_token_kl."""
    if "kl_tokens" in table.columns and table.height and table["kl_tokens"].is_not_null().all():
        return "kl_tokens"
    return "first_token_kl"


def pareto_mask(x: list[float | None], y: list[float | None]) -> list[bool]:
    """True where no other point has x and y both at most as large and one smaller (both minimised);
    a point missing either coordinate is never optimal."""
    points = [(a, b) for a, b in zip(x, y)]

    def dominated(a: float, b: float) -> bool:
        return any(c is not None and d is not None and c <= a and d <= b and (c < a or d < b) for c, d in points)

    return [a is not None and b is not None and not dominated(a, b) for a, b in points]


def with_pareto(table: pl.DataFrame) -> pl.DataFrame:
    """`pareto`: the row is on its model and scorer's front of harmful refusal rate vs KL (`kl_axis`).
    A degenerate cell is left off the front and dominates nothing: a broken model refuses nothing
    because it says nothing coherent, which is no trade-off a reader wants offered."""
    axis = kl_axis(table)
    parts = []
    for _, part in table.group_by(["model", "scorer"], maintain_order=True):
        broken = part["degenerate"].fill_null(False).to_list()
        kl = [None if b else v for v, b in zip(part[axis].to_list(), broken)]
        mask = pareto_mask(kl, part["harmful_rate"].to_list())
        parts.append(part.with_columns(pareto=pl.Series(mask, dtype=pl.Boolean)))
    if not parts:
        return table.with_columns(pareto=pl.lit(False))
    return pl.concat(parts, how="vertical")


def number_text(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def p_text(p: float | None, cell: str, reference: str = REFERENCE) -> str:
    if cell == reference and p is None:  # another direction method's ablation is compared with it: a p
        return "ref."
    if p is None:
        return "n/a"  # no ablation of this source (the baseline), or other prompts
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def rate_text(rate: float | None, low: float | None, high: float | None) -> str:
    return "" if rate is None else f"{rate:.2f} [{low:.2f}, {high:.2f}]"


def display(table: pl.DataFrame) -> pl.DataFrame:
    """The methods table for Markdown: rates with their intervals, the KLs and loss to 3 significant digits."""
    def text(expr_cols: list[str], fn) -> pl.Expr:
        return pl.struct(*expr_cols).map_elements(lambda r: fn(*(r[c] for c in expr_cols)), return_dtype=pl.String)

    return table.select(
        pl.col("condition").alias("method"),
        text(["harmful_rate", "harmful_ci_low", "harmful_ci_high"], rate_text).alias("harmful refusal"),
        pl.col("harmful_refusals").alias("refusals"),
        text(["harmless_rate", "harmless_ci_low", "harmless_ci_high"], rate_text).alias("harmless refusal"),
        *[text([m], number_text).alias(m) for m in METRICS],
        pl.when(pl.col("degenerate")).then(pl.lit("yes")).otherwise(pl.lit("")).alias("degenerate"),
        text(["p_vs_ablation", "cell"], p_text).alias("p vs ablation"),
        pl.when(pl.col("pareto")).then(pl.lit("★")).otherwise(pl.lit("")).alias("Pareto"))


def markdown(df: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines) + "\n"


def pareto_chart(table: pl.DataFrame, model: str) -> bytes:
    """Harmful refusal rate (95% Wilson interval as error bars) against KL on harmless prompts, one labelled
    point per method, the Pareto-optimal ones highlighted and joined; one panel per scorer."""
    plt = pyplot()
    axis = kl_axis(table)
    rows = table.filter(pl.col("model") == model)
    scorers = rows["scorer"].unique(maintain_order=True).to_list() or [""]
    fig, axes = plt.subplots(len(scorers), 1, figsize=(7, 4.5 * len(scorers)), squeeze=False)
    for ax, scorer in zip(axes[:, 0], scorers):
        part = rows.filter((pl.col("scorer") == scorer) & pl.col(axis).is_not_null())
        x, y = part[axis].to_numpy(), part["harmful_rate"].to_numpy()
        errors = interval_errors(y, part["harmful_ci_low"].to_numpy(), part["harmful_ci_high"].to_numpy())
        front = part["pareto"].to_numpy()
        ax.errorbar(x, y, yerr=errors, fmt="none", ecolor="grey", elinewidth=0.8, capsize=3)
        ax.scatter(x[~front], y[~front], color="#7f8c8d", zorder=3, label="dominated")
        ax.scatter(x[front], y[front], color="#c0392b", s=60, marker="D", zorder=4, label="Pareto-optimal")
        order = x[front].argsort()
        ax.plot(x[front][order], y[front][order], color="#c0392b", linewidth=0.8, linestyle="--")
        for name, a, b in zip(part["condition"].to_list(), x, y):
            ax.annotate(name, (a, b), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("symlog", linthresh=1e-3)  # KL spans 0 (baseline) to several nats
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(f"{axis} on harmless prompts (nats, KL(baseline || method))")
        ax.set_ylabel("harmful refusal rate (95% Wilson)")
        ax.set_title(f"{model}: refusal vs KL per method (scorer {scorer})", fontsize=9)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return to_png(fig, dpi=110)


def section(table: pl.DataFrame, charts: dict[str, str], out: Path) -> str:
    """The report's "Methods side by side" section: a table per model and scorer, then the model's chart."""
    axis = kl_axis(table)
    lines = ["## Methods side by side", "",
             "One row per intervention method: harmful refusal rate with its 95% Wilson interval and the count "
             "`refusals` (k/N harmful prompts still refused), harmless refusal rate, KL(baseline || method) on "
             "harmless prompts at the first answer token (`first_token_kl`) and over the first answer tokens "
             "teacher-forced on the baseline's answer (`kl_tokens`), loss on reference answers "
             "(`ce_reference`), the coherence flag, and the exact McNemar p-value of the harmful outcomes "
             "against plain `ablation` of the same direction source (`ref.`: ablation itself; `n/a`: no "
             f"ablation to pair with). ★: Pareto-optimal in (harmful refusal, `{axis}`), both lower is better.",
             ""]
    for (model, scorer), part in table.group_by(["model", "scorer"], maintain_order=True):
        lines += [f"### {model} · {scorer}", "", markdown(display(part))]
        if model in charts and scorer == table.filter(pl.col("model") == model)["scorer"][0]:
            lines += [f"![{model} methods]({Path(charts[model]).relative_to(out)})", ""]
    return "\n".join(lines)


def run(summary: pl.DataFrame, scores: pl.DataFrame, out: Path, charts: dict[str, str]) -> str:
    """Write methods.parquet, methods.csv and the per-model Pareto charts; return the report section."""
    table = methods_table(summary, scores)
    write_parquet(table.to_arrow(), out / "methods.parquet", nan_ok=())
    buf = io.StringIO()
    table.write_csv(buf)
    write_text(buf.getvalue(), out / "methods.csv")
    for model, path in charts.items():
        write_bytes(pareto_chart(table, model), path)
    return section(table, charts, out)
