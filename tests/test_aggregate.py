"""The summary's statistics: Wilson intervals, McNemar p-values vs baseline, val-picked labels, the
correlation rule, and the files `aggregate.run` writes from them."""

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import aggregate, stats
from pipeline.directions import candidates_table, mean_differences
from pipeline.figures import interval_errors
from pipeline.schemas import SCORES, SUMMARY, activations_schema, vectors_column, write_parquet

AXES = {"template": "t", "direction_model": "m", "extraction_position": -1, "normalized": False,
        "ablation_layers": None, "scorer": "s", "category": "c", "prompt": "p", "completion": "c",
        "repetition": 0.0, "nll": 2.0, "nll_neutral": 2.0}


def cell_rows(cell, source, kind, label, refused, layer=None, addition_layer=None, ids=None, model="m"):
    ids = ids or [f"p{i}" for i in range(len(refused))]
    return [{**AXES, "model": model, "source": source, "cell": cell, "intervention": kind, "extraction_layer": layer,
             "addition_layer": addition_layer, "coefficient": None if kind in ("baseline", "ablation") else 2.0,
             "prompt_id": i, "label": label, "refused": bool(r)} for i, r in zip(ids, refused)]


def grid_scores() -> pl.DataFrame:
    """One model: 8 harmful + 8 harmless prompts; baseline refuses 7/8 harmful and 0/8 harmless."""
    rows = []
    rows += cell_rows("baseline", "none", "baseline", "harmful", [1, 1, 1, 1, 1, 1, 1, 0])
    rows += cell_rows("baseline", "none", "baseline", "harmless", [0] * 8)
    # ablation: 6 prompts stop refusing, one starts (p7): b = 6, c = 1
    rows += cell_rows("ablation", "self", "ablation", "harmful", [1, 0, 0, 0, 0, 0, 0, 1], layer=3)
    rows += cell_rows("ablation", "self", "ablation", "harmless", [0] * 8, layer=3)
    # addition: 6 of 8 harmless prompts refused, none before: b = 0, c = 6
    rows += cell_rows("addition_2", "self", "addition", "harmless", [1, 1, 1, 1, 1, 1, 0, 0], layer=3,
                      addition_layer=3)
    rows += cell_rows("addition_2", "self", "addition", "harmful", [1] * 8, layer=3, addition_layer=3)
    # sweep picks: best and spread chosen on val, a declared cell, and one generated on other prompts
    rows += cell_rows("best1", "sweep", "addition", "harmless", [1] * 8, layer=4, addition_layer=2)
    rows += cell_rows("same1", "sweep", "addition", "harmless", [1, 1, 0, 0, 0, 0, 0, 0], layer=4, addition_layer=4)
    rows += cell_rows("cell1", "sweep", "addition", "harmless", [1, 0, 0, 0, 0, 0, 0, 0], layer=2, addition_layer=1)
    rows += cell_rows("spread1", "sweep", "addition", "harmless", [1, 1, 1, 0], layer=5, addition_layer=5,
                      ids=["q0", "q1", "q2", "q3"])
    return pl.DataFrame(rows, schema_overrides={"extraction_layer": pl.Int16, "addition_layer": pl.Int16,
                                                "extraction_position": pl.Int16, "ablation_layers": pl.String,
                                                "coefficient": pl.Float64})


@pytest.fixture(scope="module")
def summary():
    return aggregate.summarize(grid_scores())


def row(summary, cell, label):
    return summary.filter((pl.col("cell") == cell) & (pl.col("label") == label)).row(0, named=True)


def test_every_rate_has_its_count_and_wilson_interval(summary):
    r = row(summary, "addition_2", "harmless")
    assert (r["refused"], r["n"], r["refusal_rate"]) == (6, 8, 0.75)
    assert (r["ci_low"], r["ci_high"]) == stats.wilson_interval(6, 8)
    assert (round(r["ci_low"], 4), round(r["ci_high"], 4)) == (0.4093, 0.9285)
    base = row(summary, "baseline", "harmless")
    assert (base["ci_low"], base["ci_high"]) == (0.0, pytest.approx(Z2 / (8 + Z2)))
    assert ((summary["ci_low"] <= summary["refusal_rate"]) & (summary["refusal_rate"] <= summary["ci_high"])).all()


Z2 = 1.959963984540054 ** 2


def test_p_values_pair_each_cell_with_the_baseline_on_the_same_prompts(summary):
    assert row(summary, "baseline", "harmful")["p_value"] is None
    assert row(summary, "addition_2", "harmless")["p_value"] == 0.03125  # b = 0, c = 6: 2/2^6
    assert row(summary, "ablation", "harmful")["p_value"] == 2 * 8 / 128  # b = 6, c = 1: 2 (1 + 7)/2^7
    assert row(summary, "ablation", "harmless")["p_value"] == 1.0  # no prompt changed
    assert row(summary, "addition_2", "harmful")["p_value"] == 1.0  # b = 0, c = 1
    assert row(summary, "best1", "harmless")["p_value"] == 2 / 2 ** 8
    assert row(summary, "spread1", "harmless")["p_value"] is None  # other prompts: nothing to pair


def test_cells_picked_on_val_say_so(summary):
    picked = dict(zip(summary["cell"], summary["picked_on"]))
    assert picked == {"baseline": None, "ablation": None, "addition_2": None, "best1": "val", "same1": "val",
                      "spread1": "val", "cell1": None}  # cell1 was declared in YAML, not picked
    assert row(summary, "best1", "harmless")["condition"] == "best1: addition +2 L4→2 (picked on val)"
    assert row(summary, "cell1", "harmless")["condition"] == "cell1: addition +2 L2→1"


def test_display_shows_rate_interval_count_and_p(summary):
    shown = aggregate.display_table(aggregate.wide_table(summary))
    add = shown.filter(pl.col("cell") == "addition_2").row(0, named=True)
    assert add["harmless"] == "0.75 [0.41, 0.93] (6/8)" and add["harmless p"] == "0.0312"
    base = shown.filter(pl.col("cell") == "baseline").row(0, named=True)
    assert base["harmful"] == "0.88 [0.53, 0.98] (7/8)" and base["harmful p"] == ""
    spread = shown.filter(pl.col("cell") == "spread1").row(0, named=True)
    assert spread["harmless p"] == "n/a" and spread["harmful"] == "" and spread["harmful p"] == ""
    assert shown.columns[:9] == ["model", "source", "cell", "condition", "scorer", "extraction_layer",
                                 "addition_layer", "harmful", "harmful p"]


def test_p_text():
    assert aggregate.p_text(0.0004, "addition") == "<0.001"
    assert aggregate.p_text(1.0, "ablation") == "1"
    assert aggregate.p_text(None, "addition") == "n/a"
    assert aggregate.p_text(None, "baseline") == ""


def points(n: int) -> pl.DataFrame:
    """Generated cells whose rate rises with the score, not monotonically."""
    refused = [5, 9, 7, 12, 16, 14, 22, 28][:n]
    return pl.DataFrame({"model": ["m"] * n, "kind": ["addition"] * n, "logit_score": np.linspace(-3, 0.5, n),
                         "refusal_rate": [k / 32 for k in refused]})


def test_correlation_needs_eight_cells_and_comes_with_its_interval():
    few = aggregate.correlations(points(7)).row(0, named=True)
    assert few["cells"] == 7 and few["pearson"] is None and few["spearman"] is None
    assert few["note"] == "not estimated: 7 generated cells, fewer than 8"
    data = points(8)
    enough = aggregate.correlations(data).row(0, named=True)
    x, y = data["logit_score"].to_numpy(), data["refusal_rate"].to_numpy()
    assert enough["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert (enough["pearson_low"], enough["pearson_high"]) == stats.fisher_interval(enough["pearson"], 8)
    assert enough["spearman"] == pytest.approx(
        data.select(pl.corr("logit_score", "refusal_rate", method="spearman")).item(), abs=1e-12)
    assert enough["spearman_low"] < enough["spearman"] < enough["spearman_high"] and enough["note"] is None
    text = aggregate.correlation_text(aggregate.correlations(data)).row(0, named=True)
    assert text["pearson"] == f"{enough['pearson']:.2f} [{enough['pearson_low']:.2f}, {enough['pearson_high']:.2f}]"


def test_prediction_points_keep_one_cells_counts():
    # a grid cell and a sweep pick with the same axes: one point, its own n (not the two pooled)
    rows = (cell_rows("baseline", "none", "baseline", "harmless", [0] * 4)
            + cell_rows("addition_2", "self", "addition", "harmless", [1, 1, 0, 0], layer=3, addition_layer=3)
            + cell_rows("same1", "sweep", "addition", "harmless", [1, 1, 0, 0], layer=3, addition_layer=3))
    summary = aggregate.summarize(pl.DataFrame(rows))
    sweeps = pl.DataFrame({"model": ["m"], "kind": ["addition"], "extraction_layer": [3], "extraction_position": [-1],
                           "addition_layer": [3], "coefficient": [2.0], "label": ["harmless"], "logit_score": [0.5]})
    got = aggregate.sweep_prediction(summary, sweeps)
    assert got.height == 1 and (got["refused"][0], got["n"][0]) == (2, 4)
    assert (got["ci_low"][0], got["ci_high"][0]) == stats.wilson_interval(2, 4)


def test_interval_errors_are_distances_and_zero_where_missing():
    errors = interval_errors([0.5, 0.0, 0.2], [0.3, 0.0, None], [0.8, 0.1, None])
    np.testing.assert_allclose(errors, [[0.2, 0.0, 0.0], [0.3, 0.1, 0.0]])


def write_scores(tmp_path, scores: pl.DataFrame) -> list[str]:
    paths = []
    for (source, cell), part in scores.group_by(["source", "cell"], maintain_order=True):
        path = tmp_path / "scores" / f"{source}-{cell}.parquet"
        write_parquet(part.select(SCORES.names).to_arrow().cast(SCORES), path)
        paths.append(str(path))
    return paths


def test_run_writes_the_statistics_to_every_output(tmp_path):
    out = tmp_path / "results"
    sweep = pl.DataFrame({"model": "m", "kind": ["baseline", "addition", "addition", "addition"],
                          "extraction_layer": [None, 4, 4, 5], "extraction_position": [None, -1, -1, -1],
                          "addition_layer": [None, 2, 4, 5], "offset": [None, -2, 0, 0],
                          "coefficient": [None, 2.0, 2.0, 2.0],
                          "normalized": False, "label": "harmless", "logit_score": [-4.0, 1.0, -1.0, -2.0], "n": 8})
    picks = pl.DataFrame({"pick": ["best1", "same1", "spread1"], "kind": "addition", "extraction_layer": [4, 4, 5],
                          "extraction_position": -1, "addition_layer": [2, 4, 5], "offset": [-2, 0, 0],
                          "coefficient": 2.0, "normalized": False, "logit_score": [1.0, -1.0, -2.0]})
    (out / "sweep").mkdir(parents=True)
    sweep.write_parquet(out / "sweep" / "sweep.parquet")
    picks.write_parquet(out / "sweep" / "picks.parquet")
    (out / "sweep" / "sweep.png").write_bytes(b"")
    charts = {"m": str(out / "charts" / "m.png")}
    aggregate.run("t", write_scores(tmp_path, grid_scores()), str(out), charts,
                  sweeps={"m": tuple(str(out / "sweep" / f) for f in ("sweep.parquet", "picks.parquet", "sweep.png"))},
                  scatter_path=str(out / "charts" / "sweep_prediction.png"))
    parquet = pl.read_parquet(out / "summary.parquet")
    assert parquet.schema == pl.Schema(pl.from_arrow(SUMMARY.empty_table()).schema)
    assert parquet.height == 3 * 2 + 4  # grid cells x both labels, sweep cells x harmless
    csv = pl.read_csv(out / "summary.csv")
    assert {"n", "refused", "refusal_rate", "ci_low", "ci_high", "p_value", "picked_on"} <= set(csv.columns)
    r = csv.filter((pl.col("cell") == "addition_2") & (pl.col("label") == "harmless")).row(0, named=True)
    assert (r["n"], r["ci_low"], r["p_value"]) == (8, pytest.approx(stats.wilson_interval(6, 8)[0]), 0.03125)
    md = (out / "summary.md").read_text()
    assert "| m | addition +2 (self) | s | 3 | 3 | 1.00 [0.68, 1.00] (8/8) | 1 | 0.75 [0.41, 0.93] (6/8) | 0.0312 |" in md
    assert "Wilson" in md and "McNemar" in md
    report = (out / "report.md").read_text()
    assert "0.75 [0.41, 0.93] (6/8)" in report and "not estimated: 3 generated cells, fewer than 8" in report
    assert "Best cell, picked on val" in report and "rate on test" in report
    # best vs same, paired: 6 prompts refused only with the best cell, none only with the same-layer one
    assert "1.00 [0.68, 1.00] (8/8)" in report and "exact McNemar p = 0.0312" in report
    for chart in (*charts.values(), out / "charts" / "sweep_prediction.png"):
        assert open(chart, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def write_activations(path, model, acts: dict[str, np.ndarray]):
    """Train activations at position -1 of every layer: acts[label] is [prompts, layers, d]."""
    rows = []
    for label, array in acts.items():
        for i, prompt in enumerate(array):
            for layer, vector in enumerate(prompt):
                rows.append((f"{label}{i}", label, layer, vector))
    d = next(iter(acts.values())).shape[-1]
    table = pa.table({"model": [model] * len(rows), "template": ["t"] * len(rows),
                      "prompt_id": [r[0] for r in rows], "label": [r[1] for r in rows],
                      "layer": pa.array([r[2] for r in rows], pa.int16()),
                      "position": pa.array([-1] * len(rows), pa.int16()),
                      "refusal_score": pa.array([0.0] * len(rows), pa.float32()),
                      "act": vectors_column(np.stack([r[3] for r in rows]).astype(np.float32), pa.float32())},
                     schema=activations_schema(d, "float32"))
    write_parquet(table, path, vector_columns=("act",))
    return table


def test_direction_similarity_gets_a_bootstrap_interval_from_the_activations(tmp_path):
    rng = np.random.default_rng(0)
    d, layers, n = 12, 3, 16
    shared = rng.standard_normal((layers, d)) * 2
    unrelated = np.stack([shared[0], shared[1], rng.standard_normal(d) * 2])  # layers 0, 1 alike; 2 not
    paths, tables = {}, {}
    for model, direction in (("b", shared), ("c", unrelated)):
        acts = {"harmful": direction + rng.standard_normal((n, layers, d)),
                "harmless": rng.standard_normal((n, layers, d))}
        paths[model] = str(tmp_path / f"{model}-acts.parquet")
        tables[model] = write_activations(paths[model], model, acts)
    candidates = {}
    for model, table in tables.items():
        candidates[model] = str(tmp_path / f"{model}-candidates.parquet")
        write_parquet(candidates_table(model, mean_differences(table)), candidates[model],
                      vector_columns=("direction",))
    selection = tmp_path / "selection.parquet"
    pl.DataFrame({"layer": [1], "position": [-1], "chosen": [True]}).write_parquet(selection)
    with_ci = aggregate.direction_similarity([("b", "c")], candidates, {"c": (str(selection), "")}, paths).sort("layer")
    assert ((with_ci["ci_low"] <= with_ci["cosine"]) & (with_ci["cosine"] <= with_ci["ci_high"])).all()
    assert with_ci["ci_low"][0] > 0.5 and with_ci["ci_low"][2] < with_ci["cosine"][2] < with_ci["ci_high"][2]
    # the interval is the estimate +- 1.96 bootstrap standard errors, computed from the same activations
    acts = {m: aggregate.activations_at(p, -1)[1] for m, p in paths.items()}
    se = stats.bootstrap_cosine_se(acts["b"], acts["c"])
    low, high = stats.normal_interval(with_ci["cosine"].to_numpy(), se)
    np.testing.assert_allclose(with_ci["ci_low"], low, atol=1e-6)
    np.testing.assert_allclose(with_ci["ci_high"], high, atol=1e-6)
    without = aggregate.direction_similarity([("b", "c")], candidates, {"c": (str(selection), "")})
    assert without["ci_low"].is_null().all() and without["cosine"].to_list() == with_ci["cosine"].to_list()
    assert aggregate.similarity_chart(with_ci)[:4] == b"\x89PNG"
    assert not math.isnan(with_ci["cosine"][1])


def two_scorer_scores() -> pl.DataFrame:
    """grid_scores() scored twice: by `s` as above, and by a judge `g` that calls every harmless reply of the
    addition cell refused (8/8, against 0/8 at baseline) and the ablated harmful replies all refused."""
    first = grid_scores()
    judged = first.with_columns(scorer=pl.lit("g")).with_columns(
        refused=pl.when((pl.col("cell") == "addition_2") & (pl.col("label") == "harmless")).then(True)
        .when((pl.col("cell") == "ablation") & (pl.col("label") == "harmful")).then(True)
        .otherwise(pl.col("refused")))
    return pl.concat([first, judged])


def test_two_scorers_are_summarised_side_by_side(tmp_path):
    scores = two_scorer_scores()
    summary = aggregate.summarize(scores, scorers=["g", "s"])
    one = aggregate.summarize(grid_scores())
    assert summary.height == 2 * one.height  # every cell x label once per scorer, nothing joined twice
    for scorer in ("s", "g"):
        part = summary.filter(pl.col("scorer") == scorer)
        assert part.height == one.height
        assert part.select("n", "ci_low", "ci_high").null_count().row(0) == (0, 0, 0)
    g = summary.filter(pl.col("scorer") == "g")
    add = g.filter((pl.col("cell") == "addition_2") & (pl.col("label") == "harmless")).row(0, named=True)
    assert (add["refused"], add["n"]) == (8, 8) and (add["ci_low"], add["ci_high"]) == stats.wilson_interval(8, 8)
    assert add["p_value"] == 2 / 2 ** 8  # paired with g's own baseline: 8 prompts changed, one way
    ablated = g.filter((pl.col("cell") == "ablation") & (pl.col("label") == "harmful")).row(0, named=True)
    assert (ablated["refused"], ablated["p_value"]) == (8, 1.0)  # b = 0, c = 1 against g's 7/8 baseline
    s = summary.filter(pl.col("scorer") == "s")
    assert s.filter((pl.col("cell") == "addition_2") & (pl.col("label") == "harmless"))["p_value"].item() == 0.03125
    # the listed order: each cell's scorers on consecutive rows, g first
    assert summary.filter(pl.col("cell") == "baseline")["scorer"].to_list() == ["g", "g", "s", "s"]
    # the wide and displayed tables: one row per cell and scorer
    shown = aggregate.display_table(aggregate.wide_table(summary))
    rows = shown.filter(pl.col("cell") == "addition_2")
    assert rows["scorer"].to_list() == ["g", "s"]
    assert rows["harmless"].to_list() == ["1.00 [0.68, 1.00] (8/8)", "0.75 [0.41, 0.93] (6/8)"]
    assert rows["harmless p"].to_list() == ["0.00781", "0.0312"]


def test_run_with_two_scorers_reports_both(tmp_path):
    out = tmp_path / "results"
    charts = {"m": str(out / "charts" / "m.png")}
    aggregate.run("t", write_scores(tmp_path, two_scorer_scores()), str(out), charts, scorers=["s", "g"])
    summary = pl.read_parquet(out / "summary.parquet")
    assert set(summary["scorer"]) == {"s", "g"} and summary.height == 2 * (3 * 2 + 4)
    both = summary.filter((pl.col("cell") == "addition_2") & (pl.col("label") == "harmless")).sort("scorer")
    assert both.select("scorer", "refused", "n").rows() == [("g", 8, 8), ("s", 6, 8)]
    assert both["ci_low"].is_not_null().all() and both["ci_high"].is_not_null().all()
    md = (out / "summary.md").read_text()
    assert "| m | addition +2 (self) | s | 3 | 3 | 1.00 [0.68, 1.00] (8/8) | 1 | 0.75 [0.41, 0.93] (6/8) | 0.0312 |" in md
    assert "| m | addition +2 (self) | g | 3 | 3 | 1.00 [0.68, 1.00] (8/8) | 1 | 1.00 [0.68, 1.00] (8/8) | 0.00781 |" in md
    report = (out / "report.md").read_text()
    assert "Scorers: `s`, `g`" in report and "per scorer" in report
    # each example completion once, not once per scorer
    assert report.count("**m · addition +2 (self) · harmless**") == 2
    png = open(charts["m"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    height = int.from_bytes(png[20:24], "big")
    aggregate.run("t", write_scores(tmp_path / "one", grid_scores()), str(tmp_path / "one-out"),
                  {"m": str(tmp_path / "one-out" / "m.png")})
    assert height > 1.5 * int.from_bytes(open(tmp_path / "one-out" / "m.png", "rb").read()[20:24], "big")  # 2 panels


def test_the_report_names_each_selection_rules_pick():
    sel = pl.DataFrame({"layer": [3, 4, 5], "position": [-1, -1, -1], "bypass": [-2.0, 1.0, 0.5],
                        "cosmic": [0.5, 1.25, 0.75], "kl": [0.05, 0.1, 0.2], "chosen": [False, True, False],
                        "rule": ["cosmic"] * 3, "picks": ["auto", "cosmic", ""]})
    text = aggregate.rule_picks(sel)
    assert text.startswith("Chosen by COSMIC")
    assert "lowest bypass score): layer 3, position -1 (bypass -2.00" in text
    assert "highest cosine score): layer 4, position -1 (bypass 1.00, COSMIC score 1.250" in text
    none = aggregate.rule_picks(sel.with_columns(pl.lit("auto").alias("picks")))
    assert "COSMIC (highest cosine score): no candidate passes its filters." in none
