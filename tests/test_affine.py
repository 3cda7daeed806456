"""Affine ablation (pipeline/interventions/affine.py): the stream's component along the direction is the
harmless level plus alpha after every write, checked against a hand computation; the reference comes from
the edited model's cached activations; and its cells run through the shared tiny DAG."""

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.candidates import harmless_means
from pipeline.config import load_experiment
from pipeline.errors import ConfigError
from pipeline.generate import generate, plan_cell
from pipeline.interventions import Edit, INTERVENTIONS, make_edit
from pipeline.interventions.affine import references
from pipeline.specs import Cell

from test_interventions import direction_for, residuals_under


def test_the_component_is_the_harmless_level_plus_alpha_after_every_write(tiny):
    d = direction_for(tiny)
    u = d / d.norm()
    n = tiny.rmap.n_layers
    reference = tuple(float(v) for v in np.linspace(-1.5, 2.0, n))
    for alpha in (0.0, 3.0):
        ins, outs, _, batch = residuals_under(tiny, make_edit("affine", direction=d, reference=reference, alpha=alpha))
        real = batch.attention_mask.bool()
        for layer in range(n):
            # the block's input is set, and its writers add nothing along u: its output keeps the level
            for h in (ins[layer], outs[layer]):
                got = (h.double() @ u.double())[real]
                assert torch.allclose(got, torch.full_like(got, reference[layer] + alpha), atol=1e-4), (layer, alpha)


def test_a_zero_reference_and_alpha_is_the_ablation(tiny):
    """With m_l . u = 0 at every layer and alpha 0 the edit is directional ablation (same logits)."""
    d = direction_for(tiny, seed=3)
    zero = (0.0,) * tiny.rmap.n_layers
    _, _, affine, _ = residuals_under(tiny, make_edit("affine", direction=d, reference=zero, alpha=0.0))
    _, _, ablation, _ = residuals_under(tiny, make_edit("ablation", direction=d))
    _, _, base, _ = residuals_under(tiny, Edit())
    assert torch.allclose(affine, ablation, atol=1e-4) and not torch.allclose(affine, base, atol=1e-3)


def test_the_reference_is_the_harmless_train_mean_along_the_unit_direction(tmp_path):
    from conftest import tiny_spec
    from pipeline.activations import to_table
    from pipeline.schemas import write_parquet

    rng = np.random.default_rng(0)
    labels = ["harmful", "harmless", "harmless", "harmful", "harmless"]
    acts = rng.standard_normal((len(labels), 3, 2, 5)).astype(np.float32)  # prompts x layers x positions x hidden
    acts[[1, 2, 4]] *= 10
    prompts = pl.DataFrame({"prompt_id": [str(i) for i in range(len(labels))], "label": labels})
    path = tmp_path / "acts.parquet"
    write_parquet(to_table(tiny_spec("tiny-chat"), prompts, acts, "float32"), path)
    means = harmless_means(str(path), -1)
    by_hand = acts[[1, 2, 4], :, -1].astype(np.float64).mean(0)
    assert means.shape == (3, 5) and np.allclose(means, by_hand)
    assert np.allclose(harmless_means(str(path), -2), acts[[1, 2, 4], :, 0].astype(np.float64).mean(0))
    direction = torch.tensor(rng.standard_normal(5), dtype=torch.float32)
    unit = direction.double().numpy() / np.linalg.norm(direction.double().numpy())
    assert np.allclose(references(means, direction), by_hand @ unit)


@pytest.mark.parametrize("value,cells", [("true", ["affine_0"]), ("{alphas: [0.0, 2.5]}", ["affine_0", "affine_2.5"])])
def test_the_yaml_value_gives_one_cell_per_alpha(tmp_path, value, cells):
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    (conf / "intervention" / "aff.yaml").write_text(f"ablation: true\naffine: {value}\n")
    exp = load_experiment(["experiment=tiny", "experiment.interventions=aff"], conf_dir=conf)
    names = sorted({c.name for c in exp.cells() if c.kind == "affine"})
    assert names == cells and INTERVENTIONS.get("affine").reads_activations


@pytest.mark.parametrize("value,key", [("{alphas: [.nan]}", "affine.alphas[0]"), ("{alphas: []}", "affine.alphas"),
                                       ("{alphas: [1.0, 1.0]}", "affine.alphas[1]"), ("{alpha: [1.0]}", "affine.alpha")])
def test_bad_alphas_are_one_line_naming_the_key(tmp_path, value, key):
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    (conf / "intervention" / "aff.yaml").write_text(f"affine: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(["experiment=tiny", "experiment.interventions=aff"], conf_dir=conf)
    message = str(info.value)
    assert "intervention/aff.yaml" in message and key in message and "\n" not in message


@pytest.mark.slow
def test_the_dags_affine_cells_are_the_edit_from_the_cached_activations(tiny_dag):
    """The tiny DAG's affine_0 cell of tiny-chat, regenerated here from its selected direction and a
    reference computed by hand from its activations parquet, token for token; and the summary names it."""
    from pipeline.config import DEFAULT_CONF_DIR, load_model
    from pipeline.models import LoadedModel

    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    out, work = tiny_dag["out"], tiny_dag["work"]
    gens = pl.read_parquet(out / "generations" / "tiny-chat" / "self" / "affine_0.parquet").sort("label", "prompt_id")
    plan = plan_cell(Cell("tiny-chat", "self", "affine", 0.0), {},
                     selected_path=str(out / "directions" / "tiny-chat" / "selected.parquet"),
                     activations_path=str(out / "activations" / "tiny-chat.parquet"))
    acts = pl.read_parquet(out / "activations" / "tiny-chat.parquet")
    position = plan.extraction_position
    harmless = acts.filter((pl.col("label") == "harmless") & (pl.col("position") == position))
    unit = plan.edit.direction.double().numpy()
    unit = unit / np.linalg.norm(unit)
    by_hand = [float(np.mean(np.stack(g.sort("prompt_id")["act"].to_list()).astype(np.float64) @ unit))
               for _, g in sorted(harmless.group_by("layer"), key=lambda kv: kv[0][0])]
    assert np.allclose(plan.edit.reference, by_hand, atol=1e-6)

    spec = load_model("tiny-chat", DEFAULT_CONF_DIR, "test", "model")
    lm = LoadedModel(spec, work / "results" / "models" / "tiny-chat", "cpu", 2)
    exp = load_experiment(["experiment=tiny"])
    texts = generate(lm, gens["prompt"].to_list(), plan.edit, exp.generation.max_new_tokens,
                     exp.generation.batch_size)
    assert texts == gens["completion"].to_list()
    summary = pl.read_parquet(out / "summary.parquet").filter(pl.col("intervention") == "affine")
    assert {"affine_0", "affine_2"} <= set(summary["cell"])
    assert "affine ablation +0 (self)" in set(summary["condition"])
