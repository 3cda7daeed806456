"""The norm-preserving weight edit (pipeline/interventions/norm_preserving.py): each vector the weights
write into the stream is orthogonal to the direction with its original norm (checked against a hand
computation), the weights come back bit for bit, and how far the edit is from activation ablation."""

import pytest
import torch

from pipeline.generate import generate
from pipeline.interventions import Edit, make_edit
from pipeline.orthogonalize import _plan, orthogonalized

from test_interventions import TEXTS, direction_for, hook_generate, residuals_under


def written_vectors(module: torch.nn.Module, embedding: bool) -> list[torch.Tensor]:
    """[n, hidden] views of what a module writes into the stream: embedding rows; a Linear's columns
    (W is [out = hidden, in]) and its bias."""
    if embedding:
        return [module.weight.detach()]
    out = [module.weight.detach().T]
    return out + ([module.bias.detach().unsqueeze(0)] if module.bias is not None else [])


def by_hand(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    w = w.double()
    projected = w - torch.outer(w @ u, u)
    scale = w.norm(dim=1, keepdim=True) / projected.norm(dim=1, keepdim=True)
    return projected * torch.nan_to_num(scale)  # a zero row (a padding embedding) stays zero


def test_each_written_vector_keeps_its_norm_and_loses_the_direction(tiny):
    model = tiny.hf
    d = direction_for(tiny, seed=5)
    u = (d / d.norm()).double()
    plan = _plan(model, d, False)
    modules = [(plan.embed, True)] + [(p, False) for p in plan.projections]
    before = [[w.clone() for w in written_vectors(m, e)] for m, e in modules]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with orthogonalized(model, d, keep_norms=True):
        for (m, e), old in zip(modules, before):
            for w, w0 in zip(written_vectors(m, e), old):
                assert torch.allclose(w.double(), by_hand(w0, u), atol=1e-5, rtol=1e-5)
                assert torch.allclose(w.double().norm(dim=1), w0.double().norm(dim=1), rtol=1e-5, atol=1e-6)
                assert (w.double() @ u).abs().max() < 1e-5
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_generation_under_the_edit_and_its_distance_from_ablation(tiny):
    """The edit's `weights` is the hand-edited model (generation through the plain hooks' walk, which
    applies weight edits, equals generation with the weights edited here); its logits differ from the
    activation ablation's (the plain orthogonalisation's do not): printed, the distance measured."""
    d = direction_for(tiny, seed=3) * 4
    edit = make_edit("norm_preserving", direction=d)
    got = hook_generate(tiny, edit, 6)
    with orthogonalized(tiny.hf, d, keep_norms=True):
        want = generate(tiny, TEXTS, Edit(), max_new_tokens=6, batch_size=len(TEXTS))
    assert got == want and got != generate(tiny, TEXTS, Edit(), max_new_tokens=6, batch_size=len(TEXTS))
    _, _, ablation, batch = residuals_under(tiny, make_edit("ablation", direction=d))
    with orthogonalized(tiny.hf, d):
        _, _, plain, _ = residuals_under(tiny, Edit())
    with orthogonalized(tiny.hf, d, keep_norms=True):
        ins, outs, kept, _ = residuals_under(tiny, Edit())
    real = batch.attention_mask.bool()
    gap = (kept - ablation)[real].abs().max().item()
    print(f"{tiny.spec.name}: max |logit difference| from activation ablation: norm-preserving {gap:.4f}, "
          f"plain orthogonalisation {(plain - ablation)[real].abs().max().item():.2e}")
    assert torch.allclose(plain[real], ablation[real], atol=1e-4) and gap > 1e-3
    u = d / d.norm()
    for h in ins + outs:  # the stream stays orthogonal to the direction all the same
        assert (h @ u)[real].abs().max().item() < 1e-4 * max(h[real].norm(dim=-1).max().item(), 1.0)


def test_the_yaml_key_adds_one_cell_per_source(tmp_path):
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR, load_experiment

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    (conf / "intervention" / "np.yaml").write_text("ablation: true\nnorm_preserving: true\n")
    exp = load_experiment(["experiment=tiny", "experiment.interventions=np"], conf_dir=conf)
    cells = [c for c in exp.cells() if c.kind == "norm_preserving"]
    assert {c.name for c in cells} == {"norm_preserving"} and {c.source for c in cells} >= {"self", "random"}


@pytest.mark.slow
def test_the_dags_norm_preserving_cells_are_the_hand_edited_model(tiny_dag):
    """The tiny DAG's norm_preserving cell of tiny-base with tiny-chat's direction (a paired, weight-edited
    cell of a generate job), regenerated here with the weights edited by hand, token for token; and the
    summary names it."""
    import polars as pl

    from pipeline.config import DEFAULT_CONF_DIR, load_experiment, load_model
    from pipeline.generate import load_direction
    from pipeline.models import LoadedModel

    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    out, work = tiny_dag["out"], tiny_dag["work"]
    gens = pl.read_parquet(out / "generations" / "tiny-base" / "tiny-chat" / "norm_preserving.parquet")
    gens = gens.sort("label", "prompt_id")
    direction, *_ = load_direction(str(out / "directions" / "tiny-chat" / "selected.parquet"), "self")
    lm = LoadedModel(load_model("tiny-base", DEFAULT_CONF_DIR, "test", "model"),
                     work / "results" / "models" / "tiny-base", "cpu", 2)
    exp = load_experiment(["experiment=tiny"])
    with orthogonalized(lm.hf, direction, keep_norms=True):
        texts = generate(lm, gens["prompt"].to_list(), Edit(), exp.generation.max_new_tokens,
                         exp.generation.batch_size)
    assert texts == gens["completion"].to_list()
    summary = pl.read_parquet(out / "summary.parquet").filter(pl.col("intervention") == "norm_preserving")
    assert "norm-preserving orthogonalization (tiny-chat)" in set(summary["condition"])


def test_an_ablation_layer_range_beside_it_is_one_line(tmp_path):
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR, load_experiment
    from pipeline.errors import ConfigError

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    (conf / "intervention" / "np.yaml").write_text("ablation: {layers: {start: 1, stop: 3}}\nnorm_preserving: true\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(["experiment=tiny", "experiment.interventions=np"], conf_dir=conf)
    assert "intervention/np.yaml" in str(info.value) and "norm_preserving" in str(info.value)
    assert "\n" not in str(info.value)
