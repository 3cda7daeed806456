"""Refusal rate vs generation length: score each completion on its first k tokens, for several k.

Refusals can start late: a model may begin with a preamble and refuse a sentence later,
so a rate measured on 16 new tokens can undercount what a 128-token reply would show.
Generating once per k would cost one generation per length; greedy decoding makes that
unnecessary, since the first k tokens of a greedy generation of K > k tokens are exactly
the generation of k tokens (the same computation, step by step; `tests/test_length.py`
checks it on a tiny model). So the experiment generates once, at the longest length, and
this stage re-tokenizes each stored completion with the model's tokenizer, keeps its first
k tokens, decodes them as the generate stage does, and scores that text with each listed
phrase scorer.

Re-tokenizing is exact when the tokenizer maps the decoded text back to the generated ids,
which a greedy model's output nearly always is (canonical tokenization); where it is not,
the cut can move by a token. The stage reports, per cell, how many completions had already
ended (end of sequence) before k tokens: their truncation is the whole completion.
"""

from __future__ import annotations

import polars as pl
import pyarrow as pa
from tqdm import tqdm

from .figures import pyplot, to_png
from .refusal_phrases import is_refusal
from .schemas import LENGTH, read_parquet, write_bytes, write_parquet, write_text
from .specs import PICKED_SOURCES, LengthSpec, ModelSpec, Source
from .stats import wilson_interval

# The generation columns that identify a cell (one line of the chart).
CELL_KEYS = ["model", "source", "cell", "intervention", "extraction_layer", "addition_layer", "coefficient"]


def first_tokens(tok, completion: str, k: int) -> tuple[str, int]:
    """(the completion's first k tokens as text, its length in tokens), decoded like `generate` does."""
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    return _cut(tok, ids, completion, k), len(ids)


def _cut(tok, ids: list[int], completion: str, k: int) -> str:
    # a completion no longer than k tokens is kept as stored (no decode round trip)
    return completion if len(ids) <= k else tok.decode(ids[:k], skip_special_tokens=True)


def score_lengths(generations: pl.DataFrame, tokenizers: dict, spec: LengthSpec) -> pl.DataFrame:
    """One row per completion x k x scorer: the cell keys, label, prompt_id, tokens, scorer, refused, ended
    (the completion had fewer than k tokens, so its truncation is all of it)."""
    rows = []
    for r in tqdm(generations.iter_rows(named=True), total=generations.height, desc="length", leave=False):
        tok = tokenizers[r["model"]]
        ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        for k in spec.tokens:
            text = _cut(tok, ids, r["completion"], k)  # once per k, not once per scorer
            for scorer in spec.scorers:
                rows.append({**{c: r[c] for c in CELL_KEYS}, "label": r["label"], "prompt_id": r["prompt_id"],
                             "tokens": k, "scorer": scorer.name, "refused": is_refusal(text, scorer),
                             "ended": len(ids) < k})
    return pl.DataFrame(rows, schema_overrides={"coefficient": pl.Float64, "extraction_layer": pl.Int16,
                                                "addition_layer": pl.Int16})


def rates(per_completion: pl.DataFrame) -> pl.DataFrame:
    """Refusal rate per cell x label x scorer x k, with its 95% Wilson interval."""
    keys = [*CELL_KEYS, "label", "scorer", "tokens"]
    df = per_completion.group_by(keys, maintain_order=True).agg(
        n=pl.len().cast(pl.Int32), refused=pl.col("refused").sum().cast(pl.Int32),
        ended=pl.col("ended").sum().cast(pl.Int32))
    bounds = [wilson_interval(r, n) for r, n in zip(df["refused"].to_list(), df["n"].to_list())]
    return df.with_columns(
        refusal_rate=pl.col("refused") / pl.col("n"),
        ci_low=pl.Series([b[0] for b in bounds], dtype=pl.Float64),
        ci_high=pl.Series([b[1] for b in bounds], dtype=pl.Float64),
    ).sort(["model", "source", "cell", "label", "scorer", "tokens"])


def as_arrow(table: pl.DataFrame) -> pa.Table:
    return table.select(LENGTH.names).to_arrow().cast(LENGTH)


def cell_title(r: dict) -> str:
    """A readable name for one cell: what was done, with which direction, where."""
    kind = r["intervention"]
    if kind == "baseline":
        return "baseline"
    where = f"{r['extraction_layer']}"
    if kind == "addition":
        where += f"\u2192{r['addition_layer']}"
        kind = f"addition {r['coefficient']:+g}"
    picked = r["source"] in (Source.SWEEP, *PICKED_SOURCES)  # the cell's name says which: best1, cosmic_kl0.4, front1
    prefix = f"{r['source']} {r['cell']}: " if picked else ""
    source = "" if picked else f" ({r['source']})"
    return f"{prefix}{kind}{source}, layer {where}"


def chart(table: pl.DataFrame) -> bytes:
    """Rate vs tokens, one line per cell with 95% Wilson bars; a row of panels per model, a panel per
    label x scorer."""
    plt = pyplot()
    models = table["model"].unique(maintain_order=True).to_list()
    panels = table.select("label", "scorer").unique(maintain_order=True).sort("label", "scorer").rows()
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4.2 * len(panels), 3.6 * len(models)),
                             squeeze=False, sharey=True)
    ticks = sorted(table["tokens"].unique().to_list())
    for i, model in enumerate(models):
        for j, (label, scorer) in enumerate(panels):
            ax = axes[i][j]
            sub = table.filter((pl.col("model") == model) & (pl.col("label") == label) & (pl.col("scorer") == scorer))
            for cell in sub.select(CELL_KEYS).unique(maintain_order=True).iter_rows(named=True):
                line = sub.filter(pl.col("cell") == cell["cell"], pl.col("source") == cell["source"]).sort("tokens")
                rate = line["refusal_rate"].to_numpy()
                yerr = [rate - line["ci_low"].to_numpy(), line["ci_high"].to_numpy() - rate]
                ax.errorbar(line["tokens"].to_list(), rate, yerr=yerr, marker="o", capsize=3,
                            label=cell_title(cell))
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("new tokens scored")
            ax.set_title(f"{model}\n{label} prompts, {scorer}", fontsize=9)
            if j == 0:
                ax.set_ylabel("refusal rate (95% Wilson)")
            if sub.height:
                ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return to_png(fig)


def markdown(table: pl.DataFrame, chart_path: str, max_new_tokens: int) -> str:
    """A report fragment: one row per cell x label x scorer, one column per k."""
    ks = sorted(table["tokens"].unique().to_list())
    lines = ["## Refusal rate vs generation length", "",
             f"Each completion was generated once, greedily, with up to {max_new_tokens} new tokens, and scored "
             "on its first k tokens (re-tokenized). Rate with the 95% Wilson interval; n per row is the number "
             "of test prompts; `ended@k`: completions that had already stopped before k tokens.", "",
             f"![refusal rate vs tokens]({chart_path})", "",
             "| model | cell | label | scorer | n | " + " | ".join(f"k={k}" for k in ks) + " | ended@k |",
             "|---|---|---|---|---|" + "---|" * len(ks) + "---|"]
    groups = table.select([*CELL_KEYS, "label", "scorer"]).unique(maintain_order=True)
    for g in groups.iter_rows(named=True):
        rows = table.filter(*(pl.col(c) == g[c] if g[c] is not None else pl.col(c).is_null()
                              for c in ["model", "source", "cell", "label", "scorer"])).sort("tokens")
        by_k = {r["tokens"]: r for r in rows.iter_rows(named=True)}
        cells = [f"{by_k[k]['refusal_rate']:.3f} [{by_k[k]['ci_low']:.2f}, {by_k[k]['ci_high']:.2f}]"
                 if k in by_k else "" for k in ks]
        ended = "/".join(str(by_k[k]["ended"]) for k in ks if k in by_k)
        n = rows["n"][0]
        lines.append(f"| {g['model']} | {cell_title(g)} | {g['label']} | {g['scorer']} | {n} | "
                     + " | ".join(cells) + f" | {ended} |")
    return "\n".join(lines) + "\n"


def run(generation_paths: list[str], models: dict[str, tuple[ModelSpec, str]], spec: LengthSpec,
        table_out: str, chart_out: str, md_out: str, *, max_new_tokens: int) -> None:
    """`models`: name -> (spec, prepared dir), for the tokenizers."""
    from .models import load_tokenizer

    frames = [pl.from_arrow(read_parquet(p)) for p in generation_paths]
    generations = pl.concat([f.select([*CELL_KEYS, "label", "prompt_id", "completion"]) for f in frames])
    tokenizers = {name: load_tokenizer(s, d) for name, (s, d) in models.items()
                  if name in set(generations["model"].to_list())}
    table = rates(score_lengths(generations, tokenizers, spec))
    write_parquet(as_arrow(table), table_out)
    write_bytes(chart(table), chart_out)
    # the fragment sits in results/<experiment>/, the chart in results/<experiment>/length/
    write_text(markdown(table, "length/" + chart_out.rsplit("/", 1)[-1], max_new_tokens), md_out)
