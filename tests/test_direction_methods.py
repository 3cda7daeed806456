"""Direction methods (pipeline/direction_methods.py): the registry every place that makes a direction calls,
`direction.method` in the config, and a method of one's own loaded as a plugin, in the stages and in jobs."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import activations, candidates, directions, select, stability, stats
from pipeline.config import load_experiment
from pipeline.direction_methods import DIRECTION_METHODS, method, method_of, methods_label
from pipeline.errors import ConfigError
from pipeline.schemas import column_matrix, read_parquet, write_parquet

from conftest import assert_one_line_error
from test_stages import FakeSpec, fake_activations

ROOT = Path(__file__).resolve().parent.parent
MEDIAN_PLUGIN = Path(__file__).resolve().parent / "plugins" / "median_direction.py"
WITH_MEDIAN = ["experiment=tiny", f"+experiment.plugins=[{MEDIAN_PLUGIN}]", "+experiment.direction.method=median_diff"]


def numpy_mean_difference(harmful, harmless):
    return harmful.astype(np.float64).mean(0) - harmless.astype(np.float64).mean(0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_mean_diff_is_numpys_mean_difference_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    harmful, harmless = (rng.standard_normal((n, 32)).astype(dtype) for n in (7, 5))
    got = method("mean_diff").direction(harmful, harmless)
    assert got.dtype == np.float64 and np.array_equal(got, numpy_mean_difference(harmful, harmless))
    assert method("mean_diff").label == "difference of means" and DIRECTION_METHODS.names()[0] == "mean_diff"


def test_mean_diffs_bootstrap_form_equals_the_mean_over_the_repeated_rows():
    """mean_diff's weighted form of a draw is the plain method on the drawn rows, repeats included."""
    rng = np.random.default_rng(1)
    harmful, harmless = rng.standard_normal((6, 8)), rng.standard_normal((4, 8))
    ch, cs = rng.integers(0, 3, (5, 6)), rng.integers(1, 3, (5, 4))
    ch[:, 0] += 1  # every draw holds a harmful row
    got = method("mean_diff").directions(harmful, harmless, ch, cs)
    want = [numpy_mean_difference(np.repeat(harmful, a, 0), np.repeat(harmless, b, 0)) for a, b in zip(ch, cs)]
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-12)


def test_the_directions_stage_makes_its_candidates_by_the_registry(tmp_path):
    acts, prompts = fake_activations(np.random.default_rng(2))
    table = activations.to_table(FakeSpec, prompts, acts, "float32")
    diffs = candidates.differences(table, "mean_diff")
    for (layer, pos), (diff, _, _) in diffs.items():
        assert np.array_equal(diff, numpy_mean_difference(acts[:6, layer, pos], acts[6:, layer, pos]))
    path = tmp_path / "acts.parquet"
    write_parquet(table, path, vector_columns=("act",))
    directions.run("m", str(path), str(tmp_path / "c.parquet"), method="mean_diff", filter_prompts=False,
                   exp_file="e.yaml")
    out = read_parquet(tmp_path / "c.parquet")
    assert method_of(out) == "mean_diff" and set(out.column("method").to_pylist()) == {"mean_diff"}


def test_an_unknown_method_is_one_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "+experiment.direction.method=mean_dif"], check_models=False)
    assert_one_line_error(err, "conf/experiment/tiny.yaml", "direction.method")
    assert "'mean_dif'" in str(err.value) and "known: mean_diff" in str(err.value)
    assert load_experiment(["experiment=tiny"], check_models=False).direction.method == "mean_diff"


def median_setup(tmp_path):
    """The tiny experiment with the plugin's median method, and a small activation table on disk."""
    exp = load_experiment(WITH_MEDIAN, check_models=False)
    acts, prompts = fake_activations(np.random.default_rng(3), n_per_label=5)
    acts[:5] += np.random.default_rng(4).exponential(2.0, acts[:5].shape).astype(np.float32)  # skewed: median != mean
    path = tmp_path / "acts.parquet"
    write_parquet(activations.to_table(FakeSpec, prompts, acts, "float32"), path, vector_columns=("act",))
    return exp, acts, path


def test_a_plugin_method_makes_the_candidates(tmp_path):
    exp, acts, path = median_setup(tmp_path)
    assert exp.direction.method == "median_diff" and exp.plugins == (str(MEDIAN_PLUGIN),)
    out = tmp_path / "candidates.parquet"
    directions.run("m", str(path), str(out), method=exp.direction.method, filter_prompts=exp.direction.filter,
                   exp_file=exp.file)
    table = read_parquet(out)
    assert method_of(table) == "median_diff" and methods_label({"m": str(out)}) == "difference of medians"
    got = column_matrix(table, "direction")
    keys = list(zip(table.column("layer").to_pylist(), table.column("position").to_pylist()))
    for i, (layer, pos) in enumerate(keys):
        harmful, harmless = acts[:5, layer, pos].astype(np.float64), acts[5:, layer, pos].astype(np.float64)
        median = np.median(harmful, 0) - np.median(harmless, 0)
        assert np.array_equal(got[i], median.astype(np.float32))
        assert not np.allclose(got[i], (harmful.mean(0) - harmless.mean(0)).astype(np.float32), atol=1e-3)
    # the select stage passes the method on to the selected direction (forced: no model needed)
    outs = [tmp_path / n for n in ("selection.parquet", "selected.parquet", "selection.png")]
    select.run(type("S", (), {"name": "m", "file": "m.yaml"}), "", "", str(out), *map(str, outs), forced=(1, -1),
               rules=exp.direction.selection, filter_prompts=False, random_seed=0, device="cpu", threads=1,
               exp_file=exp.file)
    assert read_parquet(outs[1]).column("method").to_pylist() == ["median_diff", None]


def test_the_stability_bootstrap_and_the_base_chat_bootstrap_use_the_method(tmp_path):
    _, acts, path = median_setup(tmp_path)
    stack = stability.Stack(read_parquet(path))
    counts = stability.draw_counts(stack.labels, 2, seed=0)
    got = stack.directions(counts, "median_diff")
    harm = stack.labels == "harmful"
    for d in range(2):
        rows = np.repeat(np.arange(len(stack.labels)), counts[d])
        h, s = rows[harm[rows]], rows[~harm[rows]]
        want = np.median(acts[h, 1, 0].astype(np.float64), 0) - np.median(acts[s, 1, 0].astype(np.float64), 0)
        assert np.array_equal(got[d, 1, 0], want)
    full = stack.full("median_diff")
    assert np.array_equal(full[1, 0], np.median(acts[:5, 1, 0].astype(np.float64), 0)
                          - np.median(acts[5:, 1, 0].astype(np.float64), 0))

    a = {"harmful": acts[:5, :, -1], "harmless": acts[5:, :, -1]}
    b = {"harmful": acts[:5, :, -1] ** 2, "harmless": acts[5:, :, -1]}
    se = stats.bootstrap_cosine_se(a, b, resamples=30, seed=1, method="median_diff")
    draws = np.random.default_rng(1)
    i_all, j_all = draws.integers(0, 5, (30, 5)), draws.integers(0, 5, (30, 5))
    cos = []
    for i, j in zip(i_all, j_all):
        u, v = (np.median(m["harmful"][i].astype(np.float64), 0) - np.median(m["harmless"][j].astype(np.float64), 0)
                for m in (a, b))
        cos.append(stats.cosine_rows(u, v))
    np.testing.assert_allclose(se, np.std(cos, axis=0, ddof=1), rtol=0, atol=1e-12)
    assert not np.allclose(se, stats.bootstrap_cosine_se(a, b, resamples=30, seed=1), atol=1e-6)


@pytest.mark.slow
def test_a_plugin_method_through_snakemake(tmp_path):
    """The directions job of the tiny DAG loads the plugin (its params) and writes median differences of the
    cached activations; only the directions target is built."""
    from test_workflow import snakemake

    overrides = " ".join(WITH_MEDIAN)
    target = "results/tiny/directions/tiny-chat/candidates.parquet"
    proc = snakemake(tmp_path, target, "--cores", "2", "--config", f"overrides={overrides}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acts = read_parquet(tmp_path / "results/tiny/activations/tiny-chat.parquet")
    table = read_parquet(tmp_path / target)
    assert method_of(table) == "median_diff"
    frame = pl.from_arrow(acts.select(["label", "layer", "position"]))
    matrix = column_matrix(acts, "act").astype(np.float64)
    got = column_matrix(table, "direction")
    for i, (layer, pos) in enumerate(zip(table.column("layer").to_pylist(), table.column("position").to_pylist())):
        at = ((frame["layer"] == layer) & (frame["position"] == pos)).to_numpy()
        harm = at & (frame["label"] == "harmful").to_numpy()
        safe = at & (frame["label"] == "harmless").to_numpy()
        median = np.median(matrix[harm], 0) - np.median(matrix[safe], 0)
        mean = matrix[harm].mean(0) - matrix[safe].mean(0)
        assert np.array_equal(got[i], median.astype(np.float32))
        if np.linalg.norm(mean) > 1e-3:  # not the embedding layer, where every prompt's token is alike
            assert not np.allclose(got[i], mean.astype(np.float32), atol=1e-6)
