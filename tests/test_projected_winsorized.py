"""The built-in `projected` and `winsorized` direction methods (pipeline/direction_methods.py) against
independent numpy computations, their settings (`direction.method_settings`) from the config, and a
winsorized directions job through Snakemake."""

import numpy as np
import polars as pl
import pytest

from pipeline import activations, directions
from pipeline.config import load_experiment
from pipeline.direction_methods import method, method_of, method_settings_of, methods_label
from pipeline.errors import ConfigError
from pipeline.schemas import column_matrix, read_parquet, write_parquet

from conftest import assert_one_line_error
from test_stages import FakeSpec, fake_activations

WINSORIZED = ["experiment=tiny", "+experiment.direction.method=winsorized"]


def numpy_projected(harmful, harmless):
    """r - (r . u) u, r the difference of means, u the unit harmless mean."""
    mu_plus, mu_minus = harmful.mean(0), harmless.mean(0)
    r = mu_plus - mu_minus
    u = mu_minus / np.linalg.norm(mu_minus)
    return r - np.dot(r, u) * u


def numpy_winsorized(harmful, harmless, q):
    """Every row clipped to +-(the q-quantile of its absolute values), then the difference of means."""
    def clip(rows):
        return np.stack([np.clip(row, -np.quantile(np.abs(row), q), np.quantile(np.abs(row), q)) for row in rows])
    return clip(harmful).mean(0) - clip(harmless).mean(0)


def massive(rng, n, hidden=64, coordinate=3, value=4400.0):
    """Gaussian rows with one massive coordinate (as Gemma 3's), a little noisy per row."""
    rows = rng.standard_normal((n, hidden)) * 12
    rows[:, coordinate] = value + rng.standard_normal(n) * 50
    return rows


# ------------------------------------------------------------------ projected

def test_projected_is_orthogonal_to_the_harmless_mean_and_numpys():
    rng = np.random.default_rng(0)
    harmful, harmless = rng.standard_normal((9, 48)) + 1.5, rng.standard_normal((7, 48)) + 0.5
    got = method("projected").direction(harmful, harmless)
    mu_minus = harmless.mean(0)
    assert abs(got @ mu_minus) < 1e-9 * np.linalg.norm(got) * np.linalg.norm(mu_minus)
    np.testing.assert_allclose(got, numpy_projected(harmful, harmless), rtol=0, atol=1e-12)
    # raw scale kept: the difference of means less its harmless-mean part, not a unit vector
    r = harmful.mean(0) - harmless.mean(0)
    assert not np.isclose(np.linalg.norm(got), 1.0)
    np.testing.assert_allclose(np.linalg.norm(got) ** 2 + (r @ mu_minus / np.linalg.norm(mu_minus)) ** 2,
                               np.linalg.norm(r) ** 2, rtol=1e-12)
    assert method("projected").label == "projected difference of means"


def test_projected_removes_a_difference_along_the_harmless_mean():
    rng = np.random.default_rng(1)
    harmless = rng.standard_normal((6, 32)) + 2.0
    harmful = harmless * 3.0  # mean difference = 2 x the harmless mean: parallel to it
    got = method("projected").direction(harmful, harmless)
    assert np.linalg.norm(got) < 1e-12 * np.linalg.norm(harmful.mean(0) - harmless.mean(0))


def test_projected_with_a_zero_harmless_mean_is_the_difference_of_means():
    rng = np.random.default_rng(2)
    harmful, harmless = rng.standard_normal((5, 16)), np.zeros((4, 16))
    assert np.array_equal(method("projected").direction(harmful, harmless), harmful.mean(0))


# ------------------------------------------------------------------ winsorized

@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_winsorized_is_numpys_per_row_clip(q):
    rng = np.random.default_rng(3)
    harmful, harmless = massive(rng, 11), massive(rng, 8, value=4000.0)
    harmful[:, 17] += 300.0  # a second large coordinate, harmful only
    got = method("winsorized", {"quantile": q}).direction(harmful, harmless)
    np.testing.assert_allclose(got, numpy_winsorized(harmful, harmless, q), rtol=0, atol=1e-10)
    assert method("winsorized", {"quantile": q}).label == f"winsorized difference of means (q={q})"


def test_winsorized_defaults_to_q_0_99():
    made = method("winsorized")
    assert made.settings.quantile == 0.99 and made.label == "winsorized difference of means (q=0.99)"


def test_winsorized_with_nothing_clipped_is_the_difference_of_means():
    """Each row's two largest magnitudes are equal, so for q >= (hidden-2)/(hidden-1) the quantile is the row's
    largest magnitude and no component is clipped."""
    rng = np.random.default_rng(4)
    harmful, harmless = rng.standard_normal((7, 32)), rng.standard_normal((5, 32))
    for rows in (harmful, harmless):
        top = np.abs(rows).max(1) + 1.0
        rows[:, 0], rows[:, 1] = top, -top
    got = method("winsorized", {"quantile": 0.99}).direction(harmful, harmless)
    assert np.array_equal(got, method("mean_diff").direction(harmful, harmless))


def test_winsorized_bounds_a_massive_coordinate_by_the_quantile():
    rng = np.random.default_rng(5)
    harmful, harmless = massive(rng, 10, value=4400.0), massive(rng, 10, value=3000.0)
    q = 0.9
    got = method("winsorized", {"quantile": q}).direction(harmful, harmless)
    bound = max(np.quantile(np.abs(row), q) for row in np.concatenate([harmful, harmless]))
    assert abs(got[3]) <= bound < 100  # the plain difference there is ~1400
    assert abs(method("mean_diff").direction(harmful, harmless)[3]) > 1000


# ------------------------------------------------------------------ bootstrap draws

@pytest.mark.parametrize("name,settings", [("projected", {}), ("winsorized", {"quantile": 0.8})])
def test_the_bootstrap_form_is_the_method_on_the_repeated_rows(name, settings):
    rng = np.random.default_rng(6)
    harmful, harmless = massive(rng, 6, hidden=16) + 1.0, massive(rng, 4, hidden=16, value=100.0)
    ch, cs = rng.integers(0, 3, (5, 6)), rng.integers(1, 3, (5, 4))
    ch[:, 0] += 1  # every draw holds a harmful row
    made = method(name, settings)
    got = made.directions(harmful, harmless, ch, cs)
    want = [made.compute(np.repeat(harmful, a, 0), np.repeat(harmless, b, 0)) for a, b in zip(ch, cs)]
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-10, atol=1e-9)


# ------------------------------------------------------------------ settings in the config and the tables

@pytest.mark.parametrize("setting,key", [
    ("quantile:1.5", "direction.method_settings.quantile"),
    ("quantile:0", "direction.method_settings.quantile"),
    ("quantile:high", "direction.method_settings.quantile"),
    ("quantil:0.5", "direction.method_settings.quantil"),
])
def test_a_bad_setting_is_one_config_error_line(setting, key):
    with pytest.raises(ConfigError) as err:
        load_experiment([*WINSORIZED, f"+experiment.direction.method_settings={{{setting}}}"], check_models=False)
    assert_one_line_error(err, "conf/experiment/tiny.yaml", key)


def test_settings_for_a_method_without_any_are_refused():
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "+experiment.direction.method_settings={quantile:0.9}"], check_models=False)
    assert_one_line_error(err, "conf/experiment/tiny.yaml", "direction.method_settings.quantile")
    assert "takes no settings" in str(err.value)


def test_the_config_fills_in_the_default_settings():
    assert load_experiment(WINSORIZED, check_models=False).direction.method_settings == {"quantile": 0.99}
    exp = load_experiment([*WINSORIZED, "+experiment.direction.method_settings.quantile=0.9"], check_models=False)
    assert exp.direction.method_settings == {"quantile": 0.9}
    assert load_experiment(["experiment=tiny"], check_models=False).direction.method_settings == {}


def test_the_candidates_record_the_settings_and_the_label_shows_them(tmp_path):
    acts, prompts = fake_activations(np.random.default_rng(7), hidden=16)
    acts[:, :, :, 2] += 500.0
    path = tmp_path / "acts.parquet"
    write_parquet(activations.to_table(FakeSpec, prompts, acts, "float32"), path, vector_columns=("act",))
    out = tmp_path / "c.parquet"
    directions.run("m", str(path), str(out), method="winsorized", settings={"quantile": 0.75},
                   filter_prompts=False, exp_file="e.yaml")
    table = read_parquet(out)
    assert method_of(table) == "winsorized" and method_settings_of(table) == {"quantile": 0.75}
    assert methods_label({"m": str(out)}) == "winsorized difference of means (q=0.75)"
    got = column_matrix(table, "direction")
    for i, (layer, pos) in enumerate(zip(table.column("layer").to_pylist(), table.column("position").to_pylist())):
        want = numpy_winsorized(acts[:6, layer, pos].astype(np.float64), acts[6:, layer, pos].astype(np.float64), 0.75)
        np.testing.assert_allclose(got[i], want.astype(np.float32), rtol=1e-6, atol=1e-6)
    directions.run("m", str(path), str(out), method="mean_diff", filter_prompts=False, exp_file="e.yaml")
    assert method_settings_of(read_parquet(out)) == {}


# ------------------------------------------------------------------ through Snakemake

@pytest.mark.slow
def test_winsorized_through_snakemake(tmp_path):
    """The directions job of the tiny DAG with the winsorized method at q=0.6 writes the per-row clipped
    difference of means of the cached activations; only the directions target is built. A changed quantile
    reruns the directions job (the settings are its params)."""
    from test_workflow import snakemake

    overrides = " ".join([*WINSORIZED, "+experiment.direction.method_settings.quantile=0.6"])
    target = "results/tiny/directions/tiny-chat/candidates.parquet"
    proc = snakemake(tmp_path, target, "--cores", "2", "--config", f"overrides={overrides}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acts = read_parquet(tmp_path / "results/tiny/activations/tiny-chat.parquet")
    table = read_parquet(tmp_path / target)
    assert method_of(table) == "winsorized" and method_settings_of(table) == {"quantile": 0.6}
    frame = pl.from_arrow(acts.select(["label", "layer", "position"]))
    matrix = column_matrix(acts, "act").astype(np.float64)
    got = column_matrix(table, "direction")
    clipped_somewhere = False
    for i, (layer, pos) in enumerate(zip(table.column("layer").to_pylist(), table.column("position").to_pylist())):
        at = ((frame["layer"] == layer) & (frame["position"] == pos)).to_numpy()
        harm = at & (frame["label"] == "harmful").to_numpy()
        safe = at & (frame["label"] == "harmless").to_numpy()
        want = numpy_winsorized(matrix[harm], matrix[safe], 0.6)
        np.testing.assert_allclose(got[i], want.astype(np.float32), rtol=1e-5, atol=1e-6)
        mean = matrix[harm].mean(0) - matrix[safe].mean(0)
        clipped_somewhere |= not np.allclose(got[i], mean.astype(np.float32), atol=1e-4)
    assert clipped_somewhere

    changed = overrides.replace("quantile=0.6", "quantile=0.7")
    dry = snakemake(tmp_path, target, "-n", "--cores", "1", "--config", f"overrides={changed}", timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "rule directions:" in dry.stdout + dry.stderr
    same = snakemake(tmp_path, target, "-n", "--cores", "1", "--config", f"overrides={overrides}", timeout=300)
    assert "rule directions:" not in same.stdout + same.stderr
