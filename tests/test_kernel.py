"""Kernel-weighted orthogonalisation (pipeline/interventions/kernel.py): the per-layer weights against a hand
computation, each edited matrix against W - w(l) u u^T W computed here with plain torch, the exact restore,
the plain orthogonalisation as its all-ones case, its YAML, and a generation through the pipeline's path."""

import json

import pytest
import torch

from pipeline.config import load_experiment, load_intervention
from pipeline.errors import ConfigError
from pipeline.generate import CellPlan, edited_weights, generate, generate_many
from pipeline.interventions import INTERVENTIONS, Edit, Target, make_edit
from pipeline.interventions.kernel import KernelShape
from pipeline.orthogonalize import orthogonalized

from conftest import assert_one_line_error
from test_interventions import TEXTS, direction_for, hook_generate
from test_orthogonalize import build, unit_direction

ATTN = KernelShape(max_weight=1.0, max_weight_position=0.5, min_weight=0.2, min_weight_distance=1.0)
MLP = KernelShape(max_weight=0.7, max_weight_position=0, min_weight=0.3, min_weight_distance=0.5)


def test_the_weights_are_the_kernel_by_hand():
    attn = KernelShape(max_weight=1.0, max_weight_position=2.5, min_weight=0.2, min_weight_distance=2.0)
    mlp = KernelShape(max_weight=0.8, max_weight_position=3, min_weight=0.1, min_weight_distance=2.0)
    edit = make_edit("kernel", direction=torch.ones(4), attn=attn, mlp=mlp)
    # attn: distances 2.5 1.5 .5 .5 1.5 2.5 3.5 -> 1 + (d / 2)(0.2 - 1) inside 2, zero beyond
    assert edit.layer_weights("attn", 7) == pytest.approx([0.0, 0.4, 0.8, 0.8, 0.4, 0.0, 0.0], abs=1e-12)
    # mlp: the peak at block 3, halfway down at distance 1, min_weight exactly at the distance, then zero
    assert edit.layer_weights("mlp", 7) == pytest.approx([0.0, 0.1, 0.45, 0.8, 0.45, 0.1, 0.0], abs=1e-12)
    only = make_edit("kernel", direction=torch.ones(4), mlp=mlp)
    assert only.layer_weights("attn", 7) == [0.0] * 7


def writers(model, name):
    """Per block, (attention output projection, MLP down projection, stored [in, out] as Conv1D), by name."""
    if name == "gpt2":
        return [(b.attn.c_proj, b.mlp.c_proj, True) for b in model.transformer.h]
    return [(b.self_attn.o_proj, b.mlp.down_proj, False) for b in model.model.layers]


def by_hand(module, u, w, conv1d):
    """W - w u u^T W on the output axis (Conv1D: W - w W u u^T), b - w (b . u) u, in float64."""
    W, uu = module.weight.detach().double(), u.double()
    P = w * torch.outer(uu, uu)
    W = W - W @ P if conv1d else W - P @ W
    b = None if module.bias is None else module.bias.detach().double() - P @ module.bias.detach().double()
    return W, b


@pytest.mark.parametrize("name", ["llama-bias", "qwen2-tied", "gpt2"])
def test_each_matrix_is_the_weighted_edit_and_comes_back_bit_for_bit(name):
    model = build(name)
    d, u = unit_direction()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = make_edit("kernel", direction=d, attn=ATTN, mlp=MLP)
    blocks = writers(model, name)
    weights = {"attn": edit.layer_weights("attn", len(blocks)), "mlp": edit.layer_weights("mlp", len(blocks))}
    assert weights["attn"][:3] == pytest.approx([0.6, 0.6, 0.0][:len(blocks)])
    assert weights["mlp"][:3] == pytest.approx([0.7, 0.0, 0.0][:len(blocks)])
    wants = [[by_hand(m, u, weights[c][layer], conv) for c, m in (("attn", a), ("mlp", p))]
             for layer, (a, p, conv) in enumerate(blocks)]
    edited = set()
    with edit.weights(model, "cpu"):
        for layer, (a, p, conv) in enumerate(blocks):
            for component, module, (W, b) in zip(("attn", "mlp"), (a, p), wants[layer]):
                assert torch.allclose(module.weight.double(), W, atol=1e-6, rtol=1e-6), (layer, component)
                if b is not None:
                    assert torch.allclose(module.bias.double(), b, atol=1e-6, rtol=1e-6), (layer, component)
                if weights[component][layer]:
                    edited |= {id(module.weight), id(module.bias)}
        params = dict(model.named_parameters())
        for k, v in model.state_dict().items():  # every matrix the kernel gives zero weight is as it was
            p = params.get(k)
            if p is None or id(p) not in edited:
                assert torch.equal(v, before[k]), k
            else:
                assert not torch.equal(v, before[k]), k
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    if name == "qwen2-tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_all_ones_is_the_plain_orthogonalization_without_the_embedding():
    model = build("llama-bias")
    d, _ = unit_direction()
    ones = KernelShape(max_weight=1.0, max_weight_position=1, min_weight=1.0, min_weight_distance=1e6)
    edit = make_edit("kernel", direction=d, attn=ones, mlp=ones)
    names = [k for k in dict(model.named_parameters()) if ".o_proj." in k or ".down_proj." in k]
    assert len(names) == 4 * 3  # weight and bias of both writers in 3 blocks
    with orthogonalized(model, d):
        plain = {k: v.clone() for k, v in model.state_dict().items()}
    embed = model.model.embed_tokens.weight.clone()
    with edit.weights(model, "cpu"):
        state = model.state_dict()
        assert all(torch.equal(state[k], plain[k]) for k in names)
        assert torch.equal(model.model.embed_tokens.weight, embed)  # the embedding is not edited
        assert not torch.equal(plain["model.embed_tokens.weight"], embed)  # the plain form does edit it


def write_yaml(conf, text):
    (conf / "intervention" / "kern.yaml").write_text(text)


GOOD = ("kernel:\n  attn: {max_weight: 1.0, max_weight_position: 1, min_weight: 0.2, min_weight_distance: 2}\n"
        "  mlp: {max_weight: 0.8, max_weight_position: 2.5, min_weight: 0.0, min_weight_distance: 1.5}\n")


def test_the_yaml_gives_one_cell_per_source_and_its_params_make_the_edit(conf_copy):
    write_yaml(conf_copy, "ablation: true\n" + GOOD)
    exp = load_experiment(["experiment=tiny", "experiment.interventions=kern"], conf_dir=conf_copy)
    cells = [c for c in exp.cells() if c.kind == "kernel"]
    assert {c.name for c in cells} == {"kernel"} and {c.source for c in cells} >= {"self", "random"}
    kind = INTERVENTIONS.get("kernel")
    assert kind.condition("self", None) == "kernel-weighted orthogonalization (self)"
    params = json.loads(json.dumps(exp.intervention.cell_params("kernel")))  # as a Snakemake rule's params
    edit = kind.edit(Target(direction=torch.ones(64), layer=2, position=-1, model="tiny-chat"), None, params)
    assert edit.attn == KernelShape(max_weight=1.0, max_weight_position=1.0, min_weight=0.2, min_weight_distance=2.0)
    assert edit.mlp.max_weight_position == 2.5 and edit.mlp.min_weight_distance == 1.5
    assert edit.edits_weights and edit.columns() == {"ablation_layers": "kernel"}
    assert edit.layer_problem(4) is None and "3.5" in make_edit("kernel", attn=ATTN.model_copy(
        update={"max_weight_position": 3.5})).layer_problem(4)
    write_yaml(conf_copy, "ablation: true\n")
    exp = load_experiment(["experiment=tiny", "experiment.interventions=kern"], conf_dir=conf_copy)
    assert not [c for c in exp.cells() if c.kind == "kernel"]  # off unless given


@pytest.mark.parametrize("value,key", [
    ("{attn: {max_weight: .nan, max_weight_position: 1, min_weight: 0, min_weight_distance: 1}}",
     "kernel.attn.max_weight"),
    ("{mlp: {max_weight: 1, max_weight_position: 1, min_weight: .inf, min_weight_distance: 1}}",
     "kernel.mlp.min_weight"),
    ("{mlp: {max_weight: 1, max_weight_position: 1, min_weight: 0, min_weight_distance: 0}}",
     "kernel.mlp.min_weight_distance"),
    ("{attn: {max_weight: 1, max_weight_position: -1, min_weight: 0, min_weight_distance: 1}}",
     "kernel.attn.max_weight_position"),
    ("{attn: {max_weight: 1, max_weight_position: 1, min_weight_distance: 1}}", "kernel.attn.min_weight"),
    ("{attn: {max_weigth: 1, max_weight_position: 1, min_weight: 0, min_weight_distance: 1}}",
     "kernel.attn.max_weigth"),
    ("{attention: {}}", "kernel.attention"),
    ("{}", "kernel"),
    ("true", "kernel"),
])
def test_bad_values_are_one_line_naming_the_key(conf_copy, value, key):
    write_yaml(conf_copy, f"kernel: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_intervention("kern", conf_copy, "experiment/tiny.yaml")
    assert_one_line_error(info, "intervention/kern.yaml", key)


def test_a_position_past_the_last_block_is_refused_before_any_edit(tiny_chat):
    d = direction_for(tiny_chat)
    edit = make_edit("kernel", direction=d, attn=ATTN.model_copy(update={"max_weight_position": 4.0}))
    before = {k: v.clone() for k, v in tiny_chat.hf.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        with edited_weights(tiny_chat, CellPlan(source="self", edit=edit, cell="kernel"), "exp.yaml"):
            pass
    assert "max_weight_position 4 is outside the blocks 0..3" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in tiny_chat.hf.state_dict().items())


def test_a_generation_under_the_edit_differs_from_baseline_and_is_deterministic(tiny_chat):
    lm = tiny_chat
    d = direction_for(lm, seed=3) * 4
    shape = KernelShape(max_weight=1.5, max_weight_position=1.5, min_weight=0.5, min_weight_distance=2.0)
    edit = make_edit("kernel", direction=d, attn=shape, mlp=shape)
    plan = CellPlan(source="self", edit=edit, cell="kernel")

    def run():
        with edited_weights(lm, plan, "exp.yaml"):  # the generate job's own path for a weight edit
            return generate_many(lm, TEXTS, [Edit()], max_new_tokens=6, batch_size=len(TEXTS))[0][0]

    before = {k: v.clone() for k, v in lm.hf.state_dict().items()}
    baseline = generate(lm, TEXTS, Edit(), max_new_tokens=6, batch_size=len(TEXTS))
    first, second = run(), run()
    assert first == second and first != baseline and sum(map(len, first)) > 0
    assert hook_generate(lm, edit, 6) == first  # the plain hooks' walk applies the same weight edit
    assert all(torch.equal(v, before[k]) for k, v in lm.hf.state_dict().items())  # restored after each


def test_a_blockwise_edit_equals_the_whole_tensor_edit(monkeypatch):
    """Large matrices are edited a few rows at a time (bounded float64 temporaries): same bits as at once."""
    import pipeline.orthogonalize as orthogonalize_module

    d, _ = unit_direction()
    edit = make_edit("kernel", direction=d, attn=ATTN, mlp=MLP)
    whole, rows = build("llama-bias"), build("llama-bias")
    monkeypatch.setattr(orthogonalize_module, "_BLOCK_ELEMENTS", 100)  # under two rows of a 64-wide view
    with edit.weights(rows, "cpu"):
        monkeypatch.undo()
        with edit.weights(whole, "cpu"):
            a, b = whole.state_dict(), rows.state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
