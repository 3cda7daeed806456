"""Methods register themselves: a plugin file adds an intervention kind that the config, the grid, the
cell names, generation and the report all pick up, with no edit to the package."""

import re

import polars as pl
import pytest

from pipeline.aggregate import condition_name, kind_order
from pipeline.config import load_experiment
from pipeline.errors import ConfigError
from pipeline.generate import generate
from pipeline.interventions import INTERVENTIONS, Edit, make_edit
from pipeline.registry import Registry, load_plugins
from pipeline.specs import cell_name_pattern
from conftest import PLUGIN, SCALED, assert_one_line_error, with_scale_kind
from test_interventions import TEXTS, direction_for


def test_a_plugin_kind_joins_the_grid(conf_copy):
    exp = load_experiment(with_scale_kind(conf_copy), conf_dir=conf_copy, check_models=False)
    assert exp.plugins == (str(PLUGIN),)
    names = [(c.model, c.source, c.name) for c in exp.cells() if c.kind == "scale"]
    # two factors for each direction source (self, random, the pair's) of each model
    assert len(names) == 2 * 3 * 2 and ("tiny-chat", "self", "scale_0") in names and \
        ("tiny-base", "tiny-chat", "scale_1") in names
    assert all(re.fullmatch(cell_name_pattern(), n) for _, _, n in names)
    assert exp.intervention.cell_params("scale") == {}  # its settings are its cells' coefficients
    # the report's wording and order come from the registration: after the built-in kinds
    assert condition_name("scale", "self", 0.5) == "component scaled +0.5 (self)"
    assert kind_order()["scale"] > kind_order()["addition"]


def test_a_kind_key_without_its_plugin_is_one_line(conf_copy):
    overrides = with_scale_kind(conf_copy)
    (conf_copy / "intervention" / "scaled.yaml").write_text(SCALED.replace("scale:", "scael:"))
    with pytest.raises(ConfigError) as err:
        load_experiment(overrides, conf_dir=conf_copy, check_models=False)
    assert_one_line_error(err, "conf/intervention/scaled.yaml", "scael")
    assert "did you mean 'scale'" in str(err.value)


def test_a_broken_or_missing_plugin_is_one_line(conf_copy):
    broken = conf_copy / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    for entry, why in ((str(broken), "ModuleNotFoundError"), ("missing.py", "file not found")):
        with pytest.raises(ConfigError) as err:
            load_experiment(["experiment=tiny", f"+experiment.plugins=[{entry}]"], conf_dir=conf_copy,
                            check_models=False)
        assert_one_line_error(err, "experiment/tiny.yaml", "plugins[0]")
        assert why in str(err.value)


def test_registry_names_each_method_once():
    reg = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(int)
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")
    with pytest.raises(KeyError, match="unknown intervention kind 'nope'"):
        INTERVENTIONS.get("nope")


def test_plugin_edit_at_the_extremes_is_ablation_and_the_model(tiny):
    """Factor 0 removes the whole component (ablation, token for token); factor 1 changes nothing."""
    load_plugins([str(PLUGIN)])
    d = direction_for(tiny, seed=3) * 4
    scaled = {f: generate(tiny, TEXTS, make_edit("scale", direction=d, factor=f), max_new_tokens=6,
                          batch_size=len(TEXTS)) for f in (0.0, 0.5, 1.0)}
    ablated = generate(tiny, TEXTS, make_edit("ablation", direction=d), max_new_tokens=6, batch_size=len(TEXTS))
    plain = generate(tiny, TEXTS, Edit(), max_new_tokens=6, batch_size=len(TEXTS))
    assert scaled[0.0] == ablated and scaled[1.0] == plain and ablated != plain


def test_summary_of_a_kind_no_longer_registered_still_sorts():
    """A summary written with a plugin that is not loaded now: named by its raw kind, sorted last."""
    order = kind_order()
    df = pl.DataFrame({"intervention": ["gone", "addition", "baseline"]})
    ranked = df.with_columns(o=pl.col("intervention").replace_strict(order, default=len(order))).sort("o")
    assert ranked["intervention"].to_list() == ["baseline", "addition", "gone"]
    assert condition_name("gone", "self", 1.0) == "gone (self)"
