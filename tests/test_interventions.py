import typing
from pathlib import Path

import nnsight
import pytest
import torch
import transformers as T

from pipeline import config
from pipeline.architecture import get_path, residual_map
from pipeline.errors import ConfigError
from pipeline.generate import decode_until_stop, generate, plan_cell
from pipeline.models import stop_token_ids
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import apply_nnsight, torch_hooks
from pipeline.interventions.addition import ADDITION_FORMS
from pipeline.interventions.addition import AdditionSettings
from pipeline.specs import to_params
from pipeline.templates import encode_batch
from tests.conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent

TEXTS = ["Write a poem about cats.", "How do I bake sourdough bread at home?", "Explain gravity."]


def direction_for(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.rmap.hidden_size, generator=g)


def residuals_under(lm, iv):
    """Every block's input and output, and the logits, under an intervention applied via nnsight."""
    batch = encode_batch(lm.tok, lm.spec, TEXTS)
    with torch.no_grad(), lm.nn.trace(**lm.inputs(batch)):
        ins, outs = nnsight.save([]), nnsight.save([])
        apply_nnsight(lm.nn, lm.rmap, iv, record=(ins, outs))
        logits = lm.nn.output.logits.save()
    return ins, outs, logits, batch


def test_ablation_leaves_residual_orthogonal_at_every_layer(tiny):
    d = direction_for(tiny)
    u = d / d.norm()
    ins, outs, _, batch = residuals_under(tiny, make_edit("ablation", direction=d))
    base_ins, _, _, _ = residuals_under(tiny, Edit())
    real = batch.attention_mask.bool()
    for h in ins + outs:
        proj = (h @ u)[real].abs().max().item()
        scale = h[real].norm(dim=-1).max().item()
        assert proj < 1e-5 * max(scale, 1.0)
    # without ablation the stream does have a component along the direction
    assert max((h @ u)[real].abs().max().item() for h in base_ins) > 1e-3


def test_ablation_limited_to_a_layer_range(tiny):
    """Blocks before the range are untouched; inside it the stream is orthogonal to the direction."""
    d = direction_for(tiny)
    u = d / d.norm()
    start, stop = 1, 3
    base_ins, base_outs, base_logits, batch = residuals_under(tiny, Edit())
    ins, outs, logits, _ = residuals_under(tiny, make_edit("ablation", direction=d, layers=(start, stop)))
    real = batch.attention_mask.bool()
    assert torch.equal(ins[0], base_ins[0]) and torch.equal(outs[0], base_outs[0])
    for i in range(start, stop):
        for h in (ins[i], outs[i]):
            assert (h @ u)[real].abs().max().item() < 1e-5 * max(h[real].norm(dim=-1).max().item(), 1.0)
    # after the range, blocks write along the direction again
    assert (outs[-1] @ u)[real].abs().max().item() > 1e-3
    full = residuals_under(tiny, make_edit("ablation", direction=d))[2]
    assert not torch.allclose(logits, base_logits, atol=1e-4) and not torch.allclose(logits, full, atol=1e-4)


def test_addition_changes_only_the_chosen_layer(tiny):
    d = direction_for(tiny)
    layer = 2
    base_ins, base_outs, _, batch = residuals_under(tiny, Edit())
    ins, outs, _, _ = residuals_under(tiny, make_edit("addition", direction=d, layer=layer, coefficient=3.0))
    for i in range(layer):
        assert torch.equal(ins[i], base_ins[i]) and torch.equal(outs[i], base_outs[i])
    # the chosen block's input is the baseline input plus 3 d at every position, pads included
    assert torch.allclose(ins[layer], base_ins[layer] + 3.0 * d, atol=1e-5)
    assert not torch.allclose(outs[-1], base_outs[-1], atol=1e-3)


def test_normalized_addition_adds_a_unit_vector(tiny_chat):
    d = direction_for(tiny_chat) * 7
    base_ins, _, _, _ = residuals_under(tiny_chat, Edit())
    ins, _, _, _ = residuals_under(tiny_chat, make_edit("addition", direction=d, layer=1, coefficient=2.0,
                                                           normalize=True))
    assert torch.allclose(ins[1] - base_ins[1], (2.0 * d / d.norm()).expand_as(ins[1]), atol=1e-5)


def hook_generate(lm, iv, n):
    """Greedy generation with the plain-hook reference implementation."""
    from transformers import GenerationConfig

    stops = stop_token_ids(lm.hf, lm.tok)
    batch = encode_batch(lm.tok, lm.spec, TEXTS)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=lm.tok.pad_token_id,
                           eos_token_id=sorted(stops))
    kwargs = lm.inputs(batch)
    kwargs.pop("position_ids")
    with torch.no_grad(), torch_hooks(lm.hf, lm.rmap, iv):
        ids = lm.hf.generate(**kwargs, generation_config=cfg)
    return [decode_until_stop(lm.tok, r, stops) for r in ids[:, batch.input_ids.shape[1]:].tolist()]


@pytest.mark.parametrize("kind", ["ablation", "addition", "ablation_range", "addition_every_write", "affine"])
def test_nnsight_generation_matches_plain_hooks(tiny, kind):
    d = direction_for(tiny, seed=3) * 4
    if kind == "affine":
        iv = make_edit("affine", direction=d, reference=(1.0, -2.0, 0.5, 3.0)[:tiny.rmap.n_layers], alpha=2.0)
    elif kind == "ablation_range":
        iv = make_edit("ablation", direction=d, layers=(1, 3))
    elif kind == "addition_every_write":
        iv = make_edit("addition", direction=d, layer=1, coefficient=0.7, form="every_write")
    else:
        iv = make_edit("addition", direction=d, layer=1, coefficient=2.0) if kind == "addition" else \
            make_edit("ablation", direction=d)
    n = 8
    ours = generate(tiny, TEXTS, iv, max_new_tokens=n, batch_size=len(TEXTS))
    ref = hook_generate(tiny, iv, n)
    plain = generate(tiny, TEXTS, Edit(), max_new_tokens=n, batch_size=2)
    assert ours == ref
    assert sum(len(o) for o in ours) > 0
    assert ours != plain  # the intervention really changed the text


def test_hooks_are_removed(tiny_chat):
    d = direction_for(tiny_chat)
    before = len(tiny_chat.hf._forward_hooks) + sum(len(m._forward_hooks) for m in tiny_chat.hf.modules())
    with torch_hooks(tiny_chat.hf, tiny_chat.rmap, make_edit("ablation", direction=d)):
        pass
    after = len(tiny_chat.hf._forward_hooks) + sum(len(m._forward_hooks) for m in tiny_chat.hf.modules())
    assert before == after


def test_direction_of_wrong_size_is_refused(tiny_chat):
    iv = make_edit("ablation", direction=torch.ones(tiny_chat.rmap.hidden_size + 1))
    with pytest.raises(ValueError, match="hidden size"):
        generate(tiny_chat, TEXTS[:1], iv, max_new_tokens=2, batch_size=1)


# ------------------------------------------------------------------ the every_write addition form


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=64)


def build(name):
    """A tiny random model from a transformers config; norm weights and biases perturbed so they matter."""
    torch.manual_seed(0)
    if name == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON))
    elif name == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**COMMON))
    else:  # Gemma 2: post-attention and post-feedforward norms are the writers
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16))
    model.eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p)) if pname.endswith("weight") else p.copy_(0.2 * torch.randn_like(p))
    return model


def by_hand(block, x, vec, kwargs, every_write, gemma2):
    """One unsteered block, computed sub-layer by sub-layer from the stream x entering it, with `vec` added
    to the block's input and, for every_write, to what the attention and the MLP write into the stream."""
    extra = vec if every_write else torch.zeros_like(vec)
    h = x + vec
    a = block.self_attn(hidden_states=block.input_layernorm(h), **kwargs)[0]
    if gemma2:
        a = block.post_attention_layernorm(a)
    h = h + (a + extra)  # the writer's output, steered, is what is added
    if gemma2:
        m = block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
    else:
        m = block.mlp(block.post_attention_layernorm(h))
    return h + (m + extra)


@pytest.mark.parametrize("name", ["qwen2", "llama", "gemma2"])
@pytest.mark.parametrize("form", ADDITION_FORMS)
def test_addition_forms_match_a_hand_computed_block(name, form):
    """hidden_states[L + 1] under the addition equals block L computed by hand from the unsteered stream,
    through the plain hooks and through nnsight; the stream before block L is untouched."""
    model = build(name)
    rmap = residual_map(model)
    assert rmap.writers == (("post_attention_layernorm", "post_feedforward_layernorm") if name == "gemma2"
                            else ("self_attn", "mlp"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    d = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 5
    layer, c = 2, 3.0
    iv = make_edit("addition", direction=d, layer=layer, coefficient=c, normalize=True, form=form)
    block = get_path(model, rmap.layers)[layer]
    kwargs = {}
    capture = block.register_forward_pre_hook(lambda _m, _a, kw: kwargs.update(kw), with_kwargs=True)
    inputs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        base = model(**inputs).hidden_states
    capture.remove()
    kwargs.pop("hidden_states", None)
    with torch.no_grad(), torch_hooks(model, rmap, iv):
        hooked = model(**inputs).hidden_states
    nn = nnsight.NNsight(model)
    with torch.no_grad(), nn.trace(**inputs):
        apply_nnsight(nn, rmap, iv)
        traced = nn.output.hidden_states.save()
    vec = iv.vector
    assert torch.allclose(vec, c * d / d.norm(), atol=1e-6)  # c x the unit direction
    with torch.no_grad():
        expected = by_hand(block, base[layer], vec, kwargs, form == "every_write", name == "gemma2")
        once = by_hand(block, base[layer], vec, kwargs, form != "every_write", name == "gemma2")
    assert torch.equal(hooked[layer], base[layer])  # the block's input as the model had it
    for states in (hooked, traced):
        for i in range(layer):
            assert torch.equal(states[i], base[i])
        print(f"{name} {form}: max |hidden_states[L+1] - by hand| = {(states[layer + 1] - expected).abs().max():.1e}")
        assert torch.allclose(states[layer + 1], expected, rtol=0, atol=1e-5)
        assert not torch.allclose(states[layer + 1], once, atol=1e-2)  # the two forms really differ
        assert not torch.allclose(states[-1], base[-1], atol=1e-3)


def test_addition_form_names_match_the_schema():
    assert typing.get_args(AdditionSettings.model_fields["form"].annotation) == ADDITION_FORMS
    with pytest.raises(ValueError, match="addition form"):
        make_edit("addition", direction=torch.ones(4), layer=0, form="thrice")


def test_unknown_addition_form_is_one_line(conf_copy):
    (conf_copy / "intervention" / "bad.yaml").write_text("addition: {normalize: true, coefficients: [2.0], "
                                                         "form: thrice}\n")
    with pytest.raises(ConfigError) as err:
        config.load_intervention("bad", conf_copy, "test")
    assert_one_line_error(err, "conf/intervention/bad.yaml", "addition.form")
    assert "every_write" in str(err.value)


def cell_intervention(exp, cell):
    """The generate rule's intervention params for one cell (workflow/rules/common.smk)."""
    ns = {"EXP": exp, "OUT": "results", "to_params": to_params}
    exec(compile((ROOT / "workflow" / "rules" / "common.smk").read_text(), "common.smk", "exec"), ns)
    return ns["cell_intervention"](cell)


@pytest.mark.parametrize("model", ["qwen", "gemma", "llama"])
def test_base_models_experiments_use_the_posts_form(model):
    iv = config.load_intervention(f"base-models-{model}", config.DEFAULT_CONF_DIR, "test")
    assert iv["addition"].form == "every_write" and iv["addition"].normalize
    assert tuple(iv["addition"].coefficients) == {"qwen": (2.0,), "gemma": (20.0, 42.0), "llama": (4.0, 8.0, 12.0)}[model]


def test_every_write_form_reaches_the_generate_job(tmp_path, conf_copy):
    """The form is in the addition cells' params (so editing it reruns them), and the job's plan applies it."""
    from pipeline.schemas import write_parquet
    from pipeline.select import selected_table

    exp = config.load_experiment(["experiment=tiny"], check_models=False)
    addition = next(c for c in exp.cells() if c.kind == "addition" and c.source == "self")
    assert "addition_form" not in cell_intervention(exp, addition)  # the default leaves old params as they were
    (conf_copy / "intervention" / "every-write.yaml").write_text(
        "addition: {form: every_write, normalize: true, coefficients: [2.0]}\n")
    exp = config.load_experiment(["experiment=tiny", "experiment.interventions=every-write"], conf_dir=conf_copy,
                                 check_models=False)
    assert exp.intervention["addition"].form == "every_write"
    params = cell_intervention(exp, addition)
    assert params["addition_form"] == "every_write"
    ablation = next(c for c in exp.cells() if c.kind == "ablation" and c.source == "self")
    assert "addition_form" not in cell_intervention(exp, ablation)

    d = torch.randn(8).numpy().astype("float64")
    selected = tmp_path / "selected.parquet"
    write_parquet(selected_table("tiny-chat", {(1, -1): (d, 4, 4)}, 1, -1, random_seed=0), str(selected))
    plan = plan_cell(addition, params, selected_path=str(selected))
    assert plan.edit.form == "every_write"
    assert plan_cell(addition, {**params, "addition_form": "block_input"},
                     selected_path=str(selected)).edit.form == "block_input"

