"""direction.other_methods: the other direction methods as a grid axis. Each method's direction is made at the
selected layer and position from the same train prompts (checked against numpy), becomes the grid source
self-<method> with every kind's cells, and is compared in the methods table with the selected direction's
ablation; bad entries are one config line."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from pipeline import activations, directions, methods_table
from pipeline.config import load_experiment
from pipeline.errors import ConfigError
from pipeline.schemas import column_matrix, read_parquet, vectors_column, write_parquet
from pipeline.specs import Source, is_partner_source, method_source, source_method

from conftest import assert_one_line_error
from test_projected_winsorized import numpy_projected, numpy_winsorized
from test_stages import FakeSpec, fake_activations

OTHERS = ["experiment=tiny", "+experiment.direction.other_methods={projected:{},winsorized:{quantile:0.8}}"]


def selected_file(path, layer, position, hidden):
    """A selected-directions file as the select stage writes it (the direction itself is not read here)."""
    from pipeline.schemas import SELECTED_EXTRA, direction_schema

    matrix = np.ones((2, hidden), dtype=np.float32)
    write_parquet(pa.table({"model": ["m"] * 2, "source": ["self", "random"], "method": ["mean_diff", None],
                            "layer": [layer] * 2, "position": [position] * 2, "norm": [1.0, 1.0],
                            "direction": vectors_column(matrix, pa.float32())},
                           schema=direction_schema(hidden, SELECTED_EXTRA)), path, vector_columns=("direction",))


def test_each_method_is_made_at_the_selected_layer_and_position_from_the_same_prompts(tmp_path):
    rng = np.random.default_rng(3)
    acts, prompts = fake_activations(rng, n_per_label=7, n_layers=4, n_post=3, hidden=24)
    acts += 0.7  # a harmless mean far from zero, so projecting it out changes the direction
    acts_path, sel_path, out = tmp_path / "acts.parquet", tmp_path / "selected.parquet", tmp_path / "other.parquet"
    write_parquet(activations.to_table(FakeSpec, prompts, acts, "float32"), acts_path, vector_columns=("act",))
    selected_file(sel_path, layer=2, position=-2, hidden=24)
    directions.run_other_methods("m", str(acts_path), str(sel_path), str(out),
                                 methods={"projected": {}, "winsorized": {"quantile": 0.8}},
                                 filter_prompts=False, exp_file="e.yaml")
    table = read_parquet(out)
    assert table.column("source").to_pylist() == ["self-projected", "self-winsorized"]
    assert table.column("method").to_pylist() == ["projected", "winsorized"]
    assert set(table.column("layer").to_pylist()) == {2} and set(table.column("position").to_pylist()) == {-2}
    harmful, harmless = acts[:7, 2, 1].astype(np.float64), acts[7:, 2, 1].astype(np.float64)  # position -2 of 3
    got = column_matrix(table, "direction")
    np.testing.assert_allclose(got[0], numpy_projected(harmful, harmless), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], numpy_winsorized(harmful, harmless, 0.8), rtol=1e-5, atol=1e-6)
    assert abs(got[0] @ harmless.mean(0)) < 1e-4 * np.linalg.norm(got[0]) * np.linalg.norm(harmless.mean(0))
    np.testing.assert_allclose(table.column("norm").to_pylist(), np.linalg.norm(got, axis=1), rtol=1e-6)


def test_filtered_prompts_make_the_other_methods_too(tmp_path):
    """With direction.filter on, the other methods see only the prompts the candidates were made from."""
    rng = np.random.default_rng(4)
    acts, prompts = fake_activations(rng, n_per_label=6, n_layers=2, n_post=1, hidden=16)
    table = activations.to_table(FakeSpec, prompts, acts, "float32")
    # prompts 0-2 refused (kept as harmful), 6-8 answered (kept as harmless); the rest are dropped
    scores = [1.0 if i < 3 else (-1.0 if 6 <= i < 9 else (-1.0 if i < 6 else 1.0)) for i in range(12)]
    per_row = pa.array([scores[int(p[1:])] for p in table.column("prompt_id").to_pylist()], pa.float32())
    table = table.set_column(table.schema.get_field_index("refusal_score"), "refusal_score", per_row)
    acts_path, sel_path, out = tmp_path / "acts.parquet", tmp_path / "selected.parquet", tmp_path / "other.parquet"
    write_parquet(table, acts_path, vector_columns=("act",))
    selected_file(sel_path, layer=1, position=-1, hidden=16)
    directions.run_other_methods("m", str(acts_path), str(sel_path), str(out), methods={"projected": {}},
                                 filter_prompts=True, exp_file="e.yaml")
    want = numpy_projected(acts[:3, 1, 0].astype(np.float64), acts[6:9, 1, 0].astype(np.float64))
    np.testing.assert_allclose(column_matrix(read_parquet(out), "direction")[0], want, rtol=1e-5, atol=1e-6)


def test_the_sources_are_named_after_their_methods():
    assert method_source("projected") == "self-projected" and source_method("self-projected") == "projected"
    assert source_method("self") is None and source_method("tiny-base") is None
    assert is_partner_source("tiny-base") and not is_partner_source("self-projected")
    assert not any(is_partner_source(s) for s in Source)


def test_each_other_method_is_a_source_with_every_kind_in_a_job_of_its_own():
    exp = load_experiment(OTHERS, check_models=False)
    assert exp.direction.other_methods == {"projected": {}, "winsorized": {"quantile": 0.8}}
    plain = load_experiment(["experiment=tiny"], check_models=False)
    for model in exp.models:
        assert exp.direction_sources(model)[:4] == ["self", "random", "self-projected", "self-winsorized"]
        own = sorted(c.name for c in exp.cells() if (c.model, c.source) == (model, "self"))
        for source in ("self-projected", "self-winsorized"):
            assert sorted(c.name for c in exp.cells() if (c.model, c.source) == (model, source)) == own
        jobs = [j for j in exp.generate_jobs() if j.model == model and j.name.startswith("method")]
        assert {c.source for j in jobs for c in j.cells} == {"self-projected", "self-winsorized"}
    # the grid's own jobs keep their cells: adding a method reruns none of them
    grid = lambda e: [j for j in e.generate_jobs() if j.name.startswith("grid")]  # noqa: E731
    assert grid(exp) == grid(plain)


@pytest.mark.parametrize("entry, key", [
    ("{nope:{}}", "direction.other_methods.nope"),
    ("{winsorized:{quantile:1.5}}", "direction.other_methods.winsorized.quantile"),
    ("{projected:{quantile:0.5}}", "direction.other_methods.projected.quantile"),
    ("{mean_diff:{}}", "direction.other_methods.mean_diff"),  # the experiment's own method already
])
def test_a_bad_other_method_is_one_line_naming_its_key(entry, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", f"+experiment.direction.other_methods={entry}"], check_models=False)
    assert_one_line_error(err, "conf/experiment/tiny.yaml", key)


def test_another_methods_ablation_is_tested_against_the_selected_directions():
    """p against the selected direction's ablation for every cell of self-projected, its ablation included;
    "ref." only for that ablation itself."""
    prompts = [f"p{i}" for i in range(12)]
    own = [True] * 10 + [False] * 2  # the selected direction's ablation leaves 10 of 12 refused
    other = [False] * 12  # the projected direction's refuses none: 10 discordant pairs, one way
    rows = [{"model": "m", "scorer": "s", "source": src, "cell": "ablation", "label": "harmful", "prompt_id": p,
             "refused": r} for src, outcome in (("self", own), ("self-projected", other))
            for p, r in zip(prompts, outcome)]
    p = methods_table.reference_p_values(pl.DataFrame(rows))
    by_source = dict(zip(p["source"], p["p_vs_ablation"]))
    assert by_source["self"] is None
    assert by_source["self-projected"] == pytest.approx(2 * 0.5 ** 10)
    assert methods_table.p_text(None, "ablation") == "ref."
    assert methods_table.p_text(by_source["self-projected"], "ablation") == "0.00195"


@pytest.mark.slow
def test_the_dags_projected_cells_ablate_numpys_projected_direction(tiny_dag, tmp_path):
    """The tiny DAG's self-projected source: its direction is numpy's projected difference of means at the
    selected layer and position; its ablation cell, regenerated here as the plain ablation of that numpy
    direction, gives the same tokens; the report names the cells and tests them against the selected ablation."""
    from pipeline.decoding import generate
    from pipeline.generate import plan_cell
    from pipeline.models import LoadedModel
    from pipeline.specs import Cell

    from conftest import tiny_spec

    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    out, work = tiny_dag["out"], tiny_dag["work"]
    exp = load_experiment(["experiment=tiny"])
    for model in ("tiny-chat", "tiny-base"):
        own = pl.read_parquet(out / "directions" / model / "selected.parquet").filter(pl.col("source") == "self")
        layer, position = own["layer"][0], own["position"][0]
        acts = read_parquet(out / "activations" / f"{model}.parquet")
        at = pl.from_arrow(acts.select(["label", "layer", "position"])).with_row_index()
        at = at.filter((pl.col("layer") == layer) & (pl.col("position") == position))
        matrix = column_matrix(acts, "act").astype(np.float64)
        harmful = matrix[at.filter(pl.col("label") == "harmful")["index"].to_numpy()]
        harmless = matrix[at.filter(pl.col("label") == "harmless")["index"].to_numpy()]
        want = numpy_projected(harmful, harmless)
        table = read_parquet(out / "directions" / model / "other_methods.parquet")
        assert table.column("source").to_pylist() == ["self-projected"]
        assert (table.column("layer")[0].as_py(), table.column("position")[0].as_py()) == (layer, position)
        np.testing.assert_allclose(column_matrix(table, "direction")[0], want, rtol=1e-4, atol=1e-5)

        # the same direction as a plain selected file: the grid's own ablation of it, built independently
        mine = tmp_path / f"{model}.parquet"
        selected_file(mine, layer, position, want.shape[0])
        t = read_parquet(mine)
        t = t.set_column(t.schema.get_field_index("direction"), "direction",
                         vectors_column(np.stack([want, want]).astype(np.float32), pa.float32()))
        write_parquet(t, mine, vector_columns=("direction",))
        gens = pl.read_parquet(out / "generations" / model / "self-projected" / "ablation.parquet")
        gens = gens.sort("label", "prompt_id")
        assert set(gens["label"]) == {"harmful", "harmless"} and set(gens["extraction_layer"]) == {layer}
        plan = plan_cell(Cell(model, "self", "ablation"), exp.intervention.cell_params("ablation"),
                         selected_path=str(mine))
        lm = LoadedModel(tiny_spec(model), work / "results" / "models" / model, "cpu", 2)
        texts = generate(lm, gens["prompt"].to_list(), plan.edit, exp.generation.max_new_tokens,
                         exp.generation.batch_size)
        assert texts == gens["completion"].to_list()

    summary = pl.read_parquet(out / "summary.parquet").filter(pl.col("source") == "self-projected")
    assert "ablation (projected direction)" in set(summary["condition"])
    assert summary.height == 2 * 9 * 2  # 2 models x the grid's 9 direction cells x 2 labels
    methods = pl.read_parquet(out / "methods.parquet").filter(pl.col("source") == "self-projected")
    assert methods.height == 2 * 9 and methods["p_vs_ablation"].is_between(0, 1).all()


def test_a_model_named_like_a_direction_source_is_refused(conf_copy):
    """A paired model's name is its direction's source in the grid's paths: self-<method> is taken."""
    import shutil

    shutil.copy(conf_copy / "model" / "tiny-chat.yaml", conf_copy / "model" / "self-chat.yaml")
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "experiment.models=[tiny-base,self-chat]", "experiment.pairs=[]"],
                        conf_dir=conf_copy, check_models=False)
    assert_one_line_error(err, "conf/experiment/tiny.yaml", "models[1]")
