import pytest
import torch

from pipeline import capability, probes
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import torch_hooks
from pipeline.probes import last_logits
from pipeline.templates import encode_prompt

PAIRS = [("Explain how rain forms.", "Water vapour cools, condenses into droplets and falls."),
         ("Write a haiku about bread.", "Warm loaf on the sill, crust crackling in morning light.")]


def reference_loss(lm, pairs, iv):
    """Each pair alone, no padding, with transformers' own label-masked loss under plain hooks."""
    total, count = 0.0, 0
    for instruction, answer in pairs:
        prompt = encode_prompt(lm.tok, lm.spec, instruction)
        ans = lm.tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + ans])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        with torch.no_grad(), torch_hooks(lm.hf, lm.rmap, iv):
            loss = lm.hf(input_ids=ids, labels=labels).loss.item()
        total += loss * len(ans)
        count += len(ans)
    return total / count


@pytest.mark.parametrize("kind", ["baseline", "ablation", "addition"])
def test_completion_loss_matches_transformers(tiny, kind):
    d = torch.randn(tiny.rmap.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    settings = {"baseline": {}, "ablation": {"direction": d}, "addition": {"direction": d, "layer": 1, "coefficient": 2.0}}
    iv = make_edit(kind, **settings[kind])
    ours = probes.completion_loss(tiny, PAIRS, iv, batch_size=2)  # batched, left padded
    assert ours == pytest.approx(reference_loss(tiny, PAIRS, iv), rel=1e-4)


def test_measure_reports_zero_kl_for_baseline_and_more_for_steering(tiny_chat):
    harmless = ["How do I boil an egg?", "Name three rivers in Europe."]
    base = last_logits(tiny_chat, harmless, Edit(), 2)
    own = [(p, "Sure, here is how.") for p in harmless]
    m0 = capability.measure(tiny_chat, Edit(), PAIRS, own, harmless, base, 2)
    assert m0["first_token_kl"][0] == pytest.approx(0.0, abs=1e-9)
    d = torch.randn(tiny_chat.rmap.hidden_size) * 5
    m1 = capability.measure(tiny_chat, make_edit("addition", direction=d, layer=0, coefficient=3.0), PAIRS, own,
                            harmless, base, 2)
    assert m1["first_token_kl"][0] > 1e-3
    assert m1["ce_reference"][0] != pytest.approx(m0["ce_reference"][0])
    table = capability.to_table("m", "self", "addition_3", "addition", 3.0, m1)
    assert sorted(table.column("metric").to_pylist()) == ["ce_own", "ce_reference", "first_token_kl"]
