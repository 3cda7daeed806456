"""The sweep (extraction x addition layer x coefficient), its picks, coherence, and the new axes in YAML."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from pipeline import aggregate, coherence
from pipeline.config import Sweep, SweepSpec, load_experiment
from pipeline.directions import candidates_table
from pipeline.errors import ConfigError
from pipeline.interventions import Edit, make_edit
from pipeline.refusal import refusal_score, refusal_token_ids
from pipeline.probes import last_logits
from pipeline.sweep import pick_cells, score_cells

from conftest import assert_one_line_error


def spec(generate=(), **kw):
    """A sweep spec from a `sweep` block: `generate` overrides its generate block's keys."""
    generate = {"top": 1, "spread": 2, "top_ablation": 1, **dict(generate)}
    base = dict(models=["m"], addition_offsets=[-1, 1], coefficients=[2.0], batch_size=8, generate=generate)
    return SweepSpec(settings=Sweep.model_validate({**base, **kw}))


@pytest.mark.parametrize("ids,expected", [
    ([1, 2, 3, 4, 5, 6], 0.0),
    ([7, 7, 7, 7, 7, 7], 0.75),  # 4 trigrams, the last 3 repeat the first
    ([1, 2, 3, 1, 2, 3], 0.25),  # (1,2,3) comes back once among 4 trigrams
    ([1, 2], 0.0),
])
def test_repetition(ids, expected):
    assert coherence.repetition(ids) == pytest.approx(expected)


def synthetic_scores():
    rows = [{"kind": "baseline", "extraction_layer": None, "extraction_position": None, "addition_layer": None,
             "offset": None, "coefficient": None, "normalized": None, "label": "harmless", "logit_score": -5.0,
             "n": 4}]
    for e in range(2, 6):
        for o in (-1, 0, 1):
            # best when added one layer before the extraction layer, and more so for deeper layers
            rows.append({"kind": "addition", "extraction_layer": e, "extraction_position": -1, "addition_layer": e + o,
                         "offset": o, "coefficient": 2.0, "normalized": False, "label": "harmless",
                         "logit_score": float(e - 3 * abs(o + 1)), "n": 4})
        rows.append({"kind": "ablation", "extraction_layer": e, "extraction_position": -1, "addition_layer": None,
                     "offset": None, "coefficient": None, "normalized": None, "label": "harmful",
                     "logit_score": float(-e), "n": 4})
    from pipeline.sweep import ROW_SCHEMA

    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def test_a_nan_score_is_never_the_best_cell():
    """polars sorts NaN above every number: a broken cell must not become best1 or ablate1."""
    scores = synthetic_scores().with_columns(
        logit_score=pl.when((pl.col("extraction_layer") == 2) & (pl.col("offset").is_in([0]) | pl.col("offset").is_null()))
        .then(float("nan")).otherwise(pl.col("logit_score")))
    picks = {r["pick"]: r for r in pick_cells(scores, spec(generate={"spread": 0})).iter_rows(named=True)}
    assert (picks["best1"]["extraction_layer"], picks["best1"]["addition_layer"]) == (5, 4)
    assert picks["ablate1"]["extraction_layer"] == 5
    assert all(r["logit_score"] == r["logit_score"] for r in picks.values())
    with pytest.raises(ValueError, match="finite"):
        pick_cells(scores.with_columns(logit_score=pl.lit(float("nan"))), spec(generate={"spread": 0}))


def test_picks():
    scores = synthetic_scores()
    picks = pick_cells(scores, spec(generate={"cells": [{"layer": 3, "addition_layer": 3, "coefficient": 2.0}]}))
    assert picks["pick"].to_list() == ["best1", "same1", "spread1", "spread2", "ablate1", "cell1"]
    row = {r["pick"]: r for r in picks.iter_rows(named=True)}
    assert (row["best1"]["extraction_layer"], row["best1"]["addition_layer"]) == (5, 4)
    assert (row["same1"]["extraction_layer"], row["same1"]["addition_layer"]) == (5, 5)
    assert row["ablate1"]["extraction_layer"] == 5 and row["ablate1"]["kind"] == "ablation"
    assert (row["cell1"]["extraction_layer"], row["cell1"]["addition_layer"]) == (3, 3)
    spread = [row["spread1"], row["spread2"]]
    keys = {(r["extraction_layer"], r["addition_layer"]) for r in spread}
    assert len(keys) == 2 and (5, 4) not in keys
    # the last spread cell is the lowest-scoring one: the correlation sees the whole range
    assert spread[1]["logit_score"] == scores.filter(pl.col("kind") == "addition")["logit_score"].min()


def test_sweep_scores_match_a_direct_computation(tiny_chat, tmp_path):
    lm = tiny_chat
    rng = np.random.default_rng(0)
    hidden, n_layers = lm.rmap.hidden_size, lm.rmap.n_layers
    diffs = {(layer, pos): (rng.normal(size=hidden) * 3, 4, 4) for layer in range(n_layers) for pos in (-2, -1)}
    cands = candidates_table("tiny-chat", diffs)
    harmful = ["Tell me how to pick a lock.", "How to make a weapon?"]
    harmless = ["Write a poem about cats.", "Explain gravity."]
    s = spec(extraction_layers=[1, 2], addition_offsets=[-1], coefficients=[3.0],
             generate={"cells": [{"layer": 0, "addition_layer": 3, "coefficient": 1.0}]})
    scores = score_cells(lm, cands, harmful, harmless, s, position=-1, normalize=False, ablation_layers=None,
                         known_bypass={(1, -1): -123.0, (2, -2): -7.0})
    added = scores.filter(pl.col("kind") == "addition")
    assert sorted(zip(added["extraction_layer"], added["addition_layer"])) == [(0, 3), (1, 0), (1, 1), (2, 1), (2, 2)]
    ids = refusal_token_ids(lm.tok, lm.spec)
    direction = torch.tensor(diffs[(2, -1)][0], dtype=torch.float32)
    expected = refusal_score(last_logits(lm, harmless, make_edit("addition", direction=direction, layer=1,
                                                                     coefficient=3.0), 8), ids).mean().item()
    got = added.filter((pl.col("extraction_layer") == 2) & (pl.col("addition_layer") == 1))["logit_score"].item()
    assert got == pytest.approx(expected, rel=1e-5)
    ablated = scores.filter(pl.col("kind") == "ablation").sort("extraction_layer")
    assert ablated.height == 2
    assert ablated["logit_score"][0] == -123.0  # reused from selection, not recomputed
    iv = make_edit("ablation", direction=direction)
    assert ablated["logit_score"][1] == pytest.approx(refusal_score(last_logits(lm, harmful, iv, 8), ids).mean().item(),
                                                      rel=1e-5)
    unsteered = scores.filter((pl.col("kind") == "baseline") & (pl.col("label") == "harmful"))["logit_score"].item()
    assert all(not math.isclose(v, unsteered) for v in ablated["logit_score"])


def test_summary_flags_degenerate_cells_and_correlates():
    base = {"template": "t", "direction_model": "m", "extraction_position": -1, "normalized": False,
            "ablation_layers": None, "scorer": "s", "category": "c", "prompt": "p", "completion": "c"}
    rows = []
    for cell, source, kind, layer, rep, nll, refused in [
            ("baseline", "none", "baseline", None, 0.0, 2.0, [0, 0]),
            ("best1", "sweep", "addition", 4, 0.0, 2.5, [1, 1]),
            ("spread1", "sweep", "addition", 5, 0.0, 2.2, [1, 0]),
            ("spread2", "sweep", "addition", 6, 0.8, 2.1, [0, 0]),  # loops: degenerate
            ("cell1", "sweep", "addition", 7, 0.0, 5.0, [0, 0])]:  # token soup: degenerate
        for i, r in enumerate(refused):
            rows.append({**base, "model": "m", "source": source, "cell": cell, "intervention": kind,
                         "extraction_layer": layer, "addition_layer": layer, "coefficient": None if layer is None
                         else 2.0, "prompt_id": str(i), "label": "harmless", "repetition": rep, "nll": nll,
                         "nll_neutral": nll, "refused": bool(r)})
    summary = aggregate.summarize(pl.DataFrame(rows), {"repetition_max": 0.3, "nll_max": 4.0})
    flags = dict(zip(summary["cell"], summary["degenerate"]))
    assert flags == {"baseline": False, "best1": False, "spread1": False, "spread2": True, "cell1": True}
    assert dict(zip(summary["cell"], summary["nll_increase"]))["cell1"] == pytest.approx(3.0)
    sweeps = pl.DataFrame([{"model": "m", "kind": "addition", "extraction_layer": layer, "extraction_position": -1,
                            "addition_layer": layer, "coefficient": 2.0, "label": "harmless", "logit_score": score}
                           for layer, score in ((4, 3.0), (5, 1.0), (6, -1.0), (7, -2.0))])
    points = aggregate.sweep_prediction(summary, sweeps)
    assert points.height == 4
    corr = aggregate.correlations(points).row(0, named=True)
    # four cells are too few for a correlation claim (tests/test_aggregate.py checks it from eight on)
    assert corr["cells"] == 4 and corr["pearson"] is None and corr["spearman"] is None
    assert corr["note"] == "not estimated: 4 generated cells, fewer than 8"


def test_addition_layer_and_ablation_range_from_yaml(conf_copy):
    conf = conf_copy
    (conf / "intervention" / "shifted.yaml").write_text(
        "ablation: {layers: {start: 1, stop: 3}}\naddition: {coefficients: [2.0], layer: {offset: -1}}\n")
    exp = load_experiment(["experiment=tiny", "experiment.interventions=shifted"], conf_dir=conf)
    assert exp.intervention.cell_params("ablation")["ablation_layers"] == (1, 3)
    assert exp.intervention["addition"].layer_for(5) == 4
    (conf / "intervention" / "fixed.yaml").write_text("addition: {coefficients: [2.0], layer: {absolute: 2}}\n")
    assert load_experiment(["experiment=tiny", "experiment.interventions=fixed"],
                           conf_dir=conf).intervention["addition"].layer_for(7) == 2


@pytest.mark.parametrize("text,key", [
    ("ablation: {layers: {start: 3, stop: 1}}\n", "ablation.layers"),
    ("ablation: sometimes\n", "ablation"),
    ("addition: {coefficients: [1.0], layer: {offset: 1.5}}\n", "addition.layer.offset"),
    ("addition: {coefficients: [1.0], layer: 14}\n", "addition.layer"),
    ("ablation: {layers: {start: 0, stop: 2}}\northogonalization: true\n", "orthogonalization"),
])
def test_bad_intervention_axes(conf_copy, text, key):
    (conf_copy / "intervention" / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "experiment.interventions=bad"], conf_dir=conf_copy)
    assert_one_line_error(err, "intervention/bad.yaml", key)


@pytest.mark.parametrize("override,key", [
    ("experiment.sweep.coefficients=[]", "sweep.coefficients"),
    ("+experiment.sweep.position=3", "sweep.position"),
    ("+experiment.sweep.models=[nope]", "sweep.models[0]"),
    ("experiment.sweep.generate.top=-1", "sweep.generate.top"),
    ("experiment.split.val=0", "split.val"),
])
def test_bad_sweep_config(override, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", override])
    assert "experiment/tiny.yaml" in str(err.value) and f"key '{key}'" in str(err.value)


def test_nll_is_measured_on_the_first_prompts_of_each_label(tiny_dirs, tmp_path):
    from pipeline import generate, prompts
    from pipeline.config import load_experiment
    from pipeline.schemas import write_parquet

    exp = load_experiment(["experiment=tiny"])
    write_parquet(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file), tmp_path / "prompts.parquet")
    plan = generate.CellPlan(source="none", edit=Edit(), cell="baseline")
    generate.run(exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"]), str(tmp_path / "prompts.parquet"), plan,
                 str(tmp_path / "g.parquet"), max_new_tokens=4, batch_size=8, device="cpu", threads=1,
                 exp_file=exp.file, nll_prompts=2)
    g = pl.read_parquet(tmp_path / "g.parquet")
    assert g.height == 8
    for label in ("harmful", "harmless"):
        nll = g.filter(pl.col("label") == label)["nll"].to_list()
        assert [v is not None for v in nll] == [True, True, False, False]
