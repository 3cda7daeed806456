"""Weight orthogonalisation against the plain-hook activation ablation, on tiny random models."""

import copy

import pytest
import torch
import transformers as T

from pipeline.architecture import get_path, residual_map
from pipeline.interventions import make_edit
from pipeline.interventions.hooks import torch_hooks
import pipeline.orthogonalize as orthogonalize_module
from pipeline.orthogonalize import orthogonalize, orthogonalized

VOCAB, HIDDEN, LAYERS = 128, 64, 3
TOL = 1e-4  # max |logit difference|, float32
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
              num_attention_heads=4, initializer_range=0.25, max_position_embeddings=64)

CONFIGS = {
    "qwen2-tied": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2,
                                                           tie_word_embeddings=True)),
    "qwen2-untied": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**COMMON, num_key_value_heads=2,
                                                             tie_word_embeddings=False)),
    # biases on o_proj and down_proj exercise b <- b - (b.u)u
    "llama-bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=2, attention_bias=True,
                                                           mlp_bias=True)),
    "neox-parallel": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, use_parallel_residual=True)),
    "neox-sequential": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**COMMON, use_parallel_residual=False)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**COMMON, num_key_value_heads=2, head_dim=16)),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    if name == "gemma2":
        model = T.Gemma2ForCausalLM(T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16,
                                                   query_pre_attn_scalar=16))
    elif name == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                                               initializer_range=0.25, bos_token_id=0, eos_token_id=0))
    else:
        model = CONFIGS[name]()
    model.eval()
    # Norm weights initialise to a constant and biases to zero; perturb them, otherwise a
    # uniform norm scale would hide the Gemma 2 inexactness and zero biases would test nothing.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                if pname.endswith("weight"):
                    p.add_(0.3 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


def unit_direction(seed=2):
    d = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * 5
    return d, d / d.norm()


def run(model, ids, mask):
    """Logits and the residual stream: embedding output and every block's output (not the final norm)."""
    rmap = residual_map(model)
    outs = []
    handles = [b.register_forward_hook(lambda _m, _a, o: outs.append((o[0] if isinstance(o, tuple) else o).clone()))
               for b in get_path(model, rmap.layers)]
    try:
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    # hidden_states[:-1] are the block inputs; the last entry has the final norm applied, so take
    # the last block's output from the hook instead.
    return res.logits, [*res.hidden_states[:-1], outs[-1]]


def max_relative_projection(states, u, real):
    return max(((h @ u)[real].abs() / h[real].norm(dim=-1)).max().item() for h in states)


def compare(name, allow_inexact=False):
    model = build(name)
    d, u = unit_direction()
    ids, mask = batch()
    real = mask.bool()
    plain, plain_states = run(model, ids, mask)
    with torch_hooks(model, residual_map(model), make_edit("ablation", direction=d)):
        hooked, hooked_states = run(model, ids, mask)
    ortho_model = copy.deepcopy(model)
    orthogonalize(ortho_model, d, allow_inexact=allow_inexact)
    ortho, ortho_states = run(ortho_model, ids, mask)
    return dict(model=model, ortho_model=ortho_model, u=u, real=real,
                diff=(ortho - hooked)[real].abs().max().item(),
                plain_vs_hooked=(plain - hooked)[real].abs().max().item(),
                plain_vs_ortho=(plain - ortho)[real].abs().max().item(),
                plain_proj=max_relative_projection(plain_states, u, real),
                hooked_proj=max_relative_projection(hooked_states, u, real),
                ortho_proj=max_relative_projection(ortho_states, u, real))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_orthogonalised_weights_match_activation_ablation(name):
    r = compare(name)
    print(f"{name}: max |logit diff| orthogonalised vs hooks = {r['diff']:.2e}")
    assert r["diff"] < TOL
    # the ablation really changes the logits, so the comparison above can fail
    assert r["plain_vs_hooked"] > 100 * TOL and r["plain_vs_ortho"] > 100 * TOL
    # the stream of the orthogonalised model has no component along u, at every layer
    assert r["ortho_proj"] < 1e-5
    assert r["plain_proj"] > 1e-2


def test_tied_lm_head_is_untied_and_left_alone(tmp_path):
    model = build("qwen2-tied")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    head_before = model.lm_head.weight.detach().clone()
    embed_before = model.get_input_embeddings().weight.detach().clone()
    d, u = unit_direction()
    orthogonalize(model, d)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is not emb
    assert torch.equal(model.lm_head.weight, head_before)
    assert not torch.equal(emb, embed_before)
    assert (emb.double() @ u.double()).abs().max() < 1e-6
    assert model.config.tie_word_embeddings is False
    # nothing re-ties them: neither tie_weights (either way) nor a save/load round trip
    model.tie_weights()
    model.tie_weights(recompute_mapping=False)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert torch.equal(model.lm_head.weight, head_before)
    model.save_pretrained(tmp_path)
    loaded = T.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    assert torch.equal(loaded.lm_head.weight, head_before)
    assert torch.equal(loaded.get_input_embeddings().weight, emb)


def test_gpt2_conv1d_projections():
    # GPT-2 stores c_proj as a transposed Conv1D. Its learned position embeddings are not a
    # writer in residual_map, so neither form makes the stream orthogonal; the logits still match.
    r = compare("gpt2")
    print(f"gpt2: max |logit diff| orthogonalised vs hooks = {r['diff']:.2e}")
    assert r["diff"] < TOL
    assert r["plain_vs_hooked"] > 100 * TOL
    assert torch.equal(r["ortho_model"].lm_head.weight, r["model"].lm_head.weight)


def test_gemma2_post_norms_refused_unless_inexact_allowed():
    model = build("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d, _ = unit_direction()
    with pytest.raises(ValueError, match="Gemma2ForCausalLM.*not exact"):
        orthogonalize(model, d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    r = compare("gemma2", allow_inexact=True)
    print(f"gemma2 (inexact): max |logit diff| orthogonalised vs hooks = {r['diff']:.2e}")
    # activation ablation on the post-sub-layer norms does keep the stream orthogonal ...
    assert r["hooked_proj"] < 1e-5
    # ... but orthogonalising o_proj/down_proj does not: the norm scale re-introduces u
    assert r["ortho_proj"] > 1e-3
    assert r["diff"] > 100 * TOL


def test_refuses_when_writer_output_is_not_its_last_projection():
    model = build("llama-bias")
    # a scale applied after down_proj (as a gate or a mixture of experts would) breaks the weight form
    model.model.layers[1].mlp.register_forward_hook(lambda _m, _a, out: out * 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="block 1, mlp"):
        orthogonalize(model, unit_direction()[0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_direction_of_wrong_size_is_refused():
    model = build("llama-bias")
    with pytest.raises(ValueError, match="hidden size"):
        orthogonalize(model, torch.ones(HIDDEN + 1))
    with pytest.raises(ValueError, match="non-zero"):
        orthogonalize(model, torch.zeros(HIDDEN))


def snapshot(model):
    """Everything `orthogonalized` must put back: values, Parameter objects, the tie and its records."""
    return dict(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                params=dict(model.named_parameters(remove_duplicate=False)),
                tied=model.lm_head.weight is model.get_input_embeddings().weight,
                flag=model.config.tie_word_embeddings,
                mapping=dict(model.all_tied_weights_keys))


def assert_restored(model, before, same_model=True):
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for k, v in state.items():
        assert v.dtype == before["state"][k].dtype and torch.equal(v, before["state"][k]), k
    if same_model:  # the very Parameter objects, so references held elsewhere stay valid
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params.keys() == before["params"].keys()
        assert all(params[k] is p for k, p in before["params"].items())
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == before["tied"]
    assert model.config.tie_word_embeddings == before["flag"]
    assert model.all_tied_weights_keys == before["mapping"]


@pytest.mark.parametrize("name", ["qwen2-tied", "qwen2-untied"])
def test_context_restores_every_tensor_and_the_tie(name, tmp_path):
    model = build(name)
    before = snapshot(model)
    assert before["tied"] == (name == "qwen2-tied")
    with orthogonalized(model, unit_direction()[0]) as edited:
        assert edited is model
        assert model.lm_head.weight is not model.get_input_embeddings().weight
        assert not torch.equal(model.get_input_embeddings().weight, before["state"]["model.embed_tokens.weight"])
        assert torch.equal(model.lm_head.weight, before["state"]["lm_head.weight"])
    assert_restored(model, before)
    # the tie transformers would (re)build is the original one too
    model.tie_weights()
    assert_restored(model, before)
    model.save_pretrained(tmp_path)
    assert_restored(T.Qwen2ForCausalLM.from_pretrained(tmp_path).eval(), before, same_model=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_context_matches_activation_ablation_inside_and_plain_model_after(name):
    model = build(name)
    d, _ = unit_direction()
    ids, mask = batch()
    real = mask.bool()
    plain, _ = run(model, ids, mask)
    with torch_hooks(model, residual_map(model), make_edit("ablation", direction=d)):
        hooked, _ = run(model, ids, mask)
    with orthogonalized(model, d):
        ortho, _ = run(model, ids, mask)
    after, _ = run(model, ids, mask)
    assert (ortho - hooked)[real].abs().max() < TOL
    assert (plain - hooked)[real].abs().max() > 100 * TOL
    assert torch.equal(after, plain)


def test_context_restores_when_the_block_raises():
    model = build("qwen2-tied")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with orthogonalized(model, unit_direction()[0]):
            raise RuntimeError("inside")
    assert_restored(model, before)


def test_context_refusal_changes_nothing():
    model = build("gemma2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not exact"):
        with orthogonalized(model, unit_direction()[0]):
            pytest.fail("the block must not run")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_blockwise_edit_matches_whole_tensor_edit(monkeypatch):
    # The tiny models fit in one block; force several rows' worth of blocks (and ragged last ones).
    model = build("llama-bias")
    d, _ = unit_direction()
    whole = copy.deepcopy(model)
    orthogonalize(whole, d)
    monkeypatch.setattr(orthogonalize_module, "_BLOCK_ELEMENTS", 3 * HIDDEN + 5)
    orthogonalize(model, d)
    expected = whole.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], msg=k)
