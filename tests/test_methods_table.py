"""The methods side by side (pipeline/methods_table.py): one row per method with its rates, counts, KLs, loss,
coherence flag and paired p vs ablation of the same source; the Pareto front; the files and report section."""

import polars as pl
import pytest

from pipeline import aggregate, methods_table, stats
from pipeline.aggregate import CELL
from pipeline.methods_table import pareto_mask
from pipeline.schemas import SCORES, write_parquet

AXES = {"template": "t", "direction_model": "m", "extraction_position": -1, "normalized": False,
        "ablation_layers": None, "scorer": "s", "category": "c", "prompt": "p", "completion": "c",
        "repetition": 0.0, "nll": 2.0, "nll_neutral": 2.0, "model": "m", "extraction_layer": 1,
        "addition_layer": None, "coefficient": None}
# cell -> (source, kind, harmful outcomes on 8 prompts, harmless outcomes, first_token_kl, kl_tokens)
CELLS = {
    ("none", "baseline"): ("baseline", [1] * 8, [0] * 8, 0.0, 0.0),
    ("self", "ablation"): ("ablation", [0] * 7 + [1], [0] * 8, 0.2, 0.25),
    ("self", "orthogonalization"): ("orthogonalization", [0] * 8, [1] + [0] * 7, 0.5, 0.6),
    ("self", "norm_preserving"): ("norm_preserving", [1] * 6 + [0, 0], [0] * 8, 0.6, 0.9),
    ("random", "ablation"): ("ablation", [1] * 8, [0] * 8, 0.1, 0.1),
    ("random", "orthogonalization"): ("orthogonalization", [1] * 7 + [0], [0] * 8, 0.3, 0.4),
}


def scores() -> pl.DataFrame:
    rows = []
    for (source, cell), (kind, harmful, harmless, *_) in CELLS.items():
        for label, outcomes in (("harmful", harmful), ("harmless", harmless)):
            rows += [{**AXES, "source": source, "cell": cell, "intervention": kind, "label": label,
                      "prompt_id": f"{label}{i}", "refused": bool(r)} for i, r in enumerate(outcomes)]
    return pl.DataFrame(rows, schema_overrides={"extraction_layer": pl.Int16, "addition_layer": pl.Int16,
                                                "extraction_position": pl.Int16, "ablation_layers": pl.String,
                                                "coefficient": pl.Float64})


def summary() -> pl.DataFrame:
    """aggregate's summary with the capability metrics joined per cell, as `aggregate.run` builds it."""
    metrics = pl.DataFrame([{"model": "m", "source": s, "cell": c, "first_token_kl": v[3], "kl_tokens": v[4],
                             "ce_reference": 2.0 + v[3]} for (s, c), v in CELLS.items()])
    return aggregate.summarize(scores()).join(metrics, on=CELL, how="left", maintain_order="left")


@pytest.fixture(scope="module")
def table():
    return methods_table.methods_table(summary(), scores())


def row(table, source, cell):
    return table.filter((pl.col("source") == source) & (pl.col("cell") == cell)).row(0, named=True)


def test_one_row_per_method_with_rates_counts_and_costs(table):
    assert table.height == len(CELLS)
    r = row(table, "self", "ablation")
    assert r["harmful_refusals"] == "1/8" and r["harmful_rate"] == pytest.approx(1 / 8)
    assert (r["harmful_ci_low"], r["harmful_ci_high"]) == pytest.approx(stats.wilson_interval(1, 8))
    assert r["harmless_rate"] == 0.0 and (r["first_token_kl"], r["kl_tokens"], r["ce_reference"]) == (0.2, 0.25, 2.2)
    assert r["degenerate"] is False
    assert row(table, "self", "orthogonalization")["harmless_rate"] == pytest.approx(1 / 8)


def test_p_value_pairs_each_method_with_ablation_of_its_own_source(table):
    # norm_preserving (self) vs ablation (self): 1 prompt refused only under ablation, 6 only under it
    assert row(table, "self", "norm_preserving")["p_vs_ablation"] == pytest.approx(stats.mcnemar_exact(1, 6))
    assert row(table, "self", "orthogonalization")["p_vs_ablation"] == pytest.approx(stats.mcnemar_exact(1, 0))
    # random orthogonalization against the random ablation, not the self one
    assert row(table, "random", "orthogonalization")["p_vs_ablation"] == pytest.approx(stats.mcnemar_exact(1, 0))
    assert row(table, "self", "ablation")["p_vs_ablation"] is None  # the reference itself
    assert row(table, "none", "baseline")["p_vs_ablation"] is None  # no ablation of source none


def test_pareto_front_on_kl_tokens_and_harmful_refusal(table):
    front = set(table.filter(pl.col("pareto")).select("source", "cell").iter_rows())
    assert front == {("none", "baseline"), ("self", "ablation"), ("self", "orthogonalization")}
    assert methods_table.kl_axis(table) == "kl_tokens"
    # without kl_tokens for every method, the front is taken on first_token_kl
    assert methods_table.kl_axis(table.with_columns(kl_tokens=pl.lit(None, pl.Float64))) == "first_token_kl"


def test_a_degenerate_cell_is_not_on_the_front(table):
    # the ablation cell (on the front above) flagged degenerate: off the front, and it no longer dominates
    broken = table.drop("pareto").with_columns(
        degenerate=(pl.col("source") == "self") & (pl.col("cell") == "ablation"))
    front = set(methods_table.with_pareto(broken).filter(pl.col("pareto")).select("source", "cell").iter_rows())
    assert ("self", "ablation") not in front and ("none", "baseline") in front


def test_pareto_mask():
    assert pareto_mask([0.0, 0.1, 0.2, 0.3], [1.0, 1.0, 0.1, 0.0]) == [True, False, True, True]
    assert pareto_mask([0.1, 0.1], [0.5, 0.5]) == [True, True]  # equal points do not dominate each other
    assert pareto_mask([None, 0.2, 0.3], [0.0, 0.5, 0.6]) == [False, True, False]  # no KL: not on the front
    assert pareto_mask([], []) == []


def test_display_text():
    shown = methods_table.display(methods_table.methods_table(summary(), scores()))
    r = shown.filter(pl.col("method") == "norm-preserving orthogonalization (self)").row(0, named=True)
    assert r["harmful refusal"] == "0.75 [0.41, 0.93]" and r["refusals"] == "6/8"
    assert r["p vs ablation"] == f"{stats.mcnemar_exact(1, 6):.3g}" and r["Pareto"] == ""
    assert shown.filter(pl.col("method") == "ablation (self)")["p vs ablation"][0] == "ref."
    assert shown.filter(pl.col("method") == "baseline")["p vs ablation"][0] == "n/a"


def test_aggregate_writes_the_methods_table_chart_and_section(tmp_path):
    paths = []
    for (source, cell), part in scores().group_by(["source", "cell"], maintain_order=True):
        paths.append(str(tmp_path / "scores" / f"{source}-{cell}.parquet"))
        write_parquet(part.select(SCORES.names).to_arrow().cast(SCORES), paths[-1])
    out = tmp_path / "results"
    charts = {"m": str(out / "charts" / "m.png")}
    methods = {"m": str(out / "charts" / "methods_m.png")}
    aggregate.run("t", paths, str(out), charts, methods_charts=methods)
    parquet = pl.read_parquet(out / "methods.parquet")
    assert parquet.height == len(CELLS) and {"harmful_refusals", "p_vs_ablation", "pareto"} <= set(parquet.columns)
    assert pl.read_csv(out / "methods.csv").height == len(CELLS)
    assert open(methods["m"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Methods side by side" in report and "charts/methods_m.png" in report
    assert "| norm-preserving orthogonalization (self) | 0.75 [0.41, 0.93] | 6/8 |" in report
