import nnsight
import pytest
import torch

from pipeline.generate import decode_until_stop, generate
from pipeline.models import stop_token_ids
from pipeline.interventions import Intervention, apply_nnsight, torch_hooks
from pipeline.templates import encode_batch

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
    ins, outs, _, batch = residuals_under(tiny, Intervention("ablation", direction=d))
    base_ins, _, _, _ = residuals_under(tiny, Intervention("baseline"))
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
    base_ins, base_outs, base_logits, batch = residuals_under(tiny, Intervention("baseline"))
    ins, outs, logits, _ = residuals_under(tiny, Intervention("ablation", direction=d, layers=(start, stop)))
    real = batch.attention_mask.bool()
    assert torch.equal(ins[0], base_ins[0]) and torch.equal(outs[0], base_outs[0])
    for i in range(start, stop):
        for h in (ins[i], outs[i]):
            assert (h @ u)[real].abs().max().item() < 1e-5 * max(h[real].norm(dim=-1).max().item(), 1.0)
    # after the range, blocks write along the direction again
    assert (outs[-1] @ u)[real].abs().max().item() > 1e-3
    full = residuals_under(tiny, Intervention("ablation", direction=d))[2]
    assert not torch.allclose(logits, base_logits, atol=1e-4) and not torch.allclose(logits, full, atol=1e-4)


def test_addition_changes_only_the_chosen_layer(tiny):
    d = direction_for(tiny)
    layer = 2
    base_ins, base_outs, _, batch = residuals_under(tiny, Intervention("baseline"))
    ins, outs, _, _ = residuals_under(tiny, Intervention("addition", direction=d, layer=layer, coefficient=3.0))
    for i in range(layer):
        assert torch.equal(ins[i], base_ins[i]) and torch.equal(outs[i], base_outs[i])
    # the chosen block's input is the baseline input plus 3 d at every position, pads included
    assert torch.allclose(ins[layer], base_ins[layer] + 3.0 * d, atol=1e-5)
    assert not torch.allclose(outs[-1], base_outs[-1], atol=1e-3)


def test_normalized_addition_adds_a_unit_vector(tiny_chat):
    d = direction_for(tiny_chat) * 7
    base_ins, _, _, _ = residuals_under(tiny_chat, Intervention("baseline"))
    ins, _, _, _ = residuals_under(tiny_chat, Intervention("addition", direction=d, layer=1, coefficient=2.0,
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


@pytest.mark.parametrize("kind", ["ablation", "addition", "ablation_range"])
def test_nnsight_generation_matches_plain_hooks(tiny, kind):
    d = direction_for(tiny, seed=3) * 4
    if kind == "ablation_range":
        iv = Intervention("ablation", direction=d, layers=(1, 3))
    else:
        iv = Intervention(kind, direction=d, layer=1 if kind == "addition" else None, coefficient=2.0)
    n = 8
    ours = generate(tiny, TEXTS, iv, max_new_tokens=n, batch_size=len(TEXTS))
    ref = hook_generate(tiny, iv, n)
    plain = generate(tiny, TEXTS, Intervention("baseline"), max_new_tokens=n, batch_size=2)
    assert ours == ref
    assert sum(len(o) for o in ours) > 0
    assert ours != plain  # the intervention really changed the text


def test_hooks_are_removed(tiny_chat):
    d = direction_for(tiny_chat)
    before = len(tiny_chat.hf._forward_hooks) + sum(len(m._forward_hooks) for m in tiny_chat.hf.modules())
    with torch_hooks(tiny_chat.hf, tiny_chat.rmap, Intervention("ablation", direction=d)):
        pass
    after = len(tiny_chat.hf._forward_hooks) + sum(len(m._forward_hooks) for m in tiny_chat.hf.modules())
    assert before == after


def test_direction_of_wrong_size_is_refused(tiny_chat):
    iv = Intervention("ablation", direction=torch.ones(tiny_chat.rmap.hidden_size + 1))
    with pytest.raises(ValueError, match="hidden size"):
        generate(tiny_chat, TEXTS[:1], iv, max_new_tokens=2, batch_size=1)
