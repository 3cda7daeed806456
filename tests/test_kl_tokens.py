"""kl_tokens (pipeline/capability.py): KL(baseline || steered) over the first k answer positions, teacher-forced
on the baseline's own answer, checked against plain torch (one prompt at a time, no padding, plain hooks)."""

import pytest
import torch

from pipeline import capability
from pipeline.config import Capability
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import torch_hooks
from pipeline.probes import answer_logits, last_logits
from pipeline.templates import encode_prompt

HARMLESS = ["How do I boil an egg?", "Name three rivers in Europe.", "Write a haiku about bread."]
# the baseline's own answers: one longer than k, one shorter, one empty (only its first position counts)
ANSWERS = ["Put the egg in boiling water for about nine minutes, then cool it.", "Rhine, Danube", ""]
OWN = list(zip(HARMLESS, ANSWERS))


def steering(lm) -> Edit:
    d = torch.randn(lm.rmap.hidden_size, generator=torch.Generator().manual_seed(1)) * 5
    return make_edit("addition", direction=d, layer=0, coefficient=3.0)


def plain_kl_tokens(lm, pairs, iv, k: int) -> float:
    """Each prompt alone: prompt + answer[:k - 1] through transformers with and without `iv`, KL at the
    positions predicting the answer's first k tokens, mean per prompt, then over prompts."""
    per_prompt = []
    for instruction, answer in pairs:
        prompt = encode_prompt(lm.tok, lm.spec, instruction)
        forced = lm.tok(answer, add_special_tokens=False)["input_ids"][:k - 1]
        ids = torch.tensor([prompt + forced])
        with torch.no_grad():
            base = lm.hf(input_ids=ids).logits[0].double()
            with torch_hooks(lm.hf, lm.rmap, iv):
                steered = lm.hf(input_ids=ids).logits[0].double()
        span = slice(len(prompt) - 1, len(prompt) + len(forced))
        p, q = torch.log_softmax(base[span], -1), torch.log_softmax(steered[span], -1)
        per_prompt.append((p.exp() * (p - q)).sum(-1).mean().item())
    return sum(per_prompt) / len(per_prompt)


def kl_tokens(lm, iv, k: int, batch_size: int = 2) -> float:
    answers = capability.baseline_answers(lm, OWN, k, batch_size)
    base = last_logits(lm, HARMLESS, Edit(), batch_size)
    return capability.measure(lm, iv, [OWN[0]], OWN, HARMLESS, base, batch_size, answers)["kl_tokens"][0]


@pytest.mark.parametrize("k", [2, 4, 8])
def test_kl_tokens_matches_plain_torch(tiny_chat, k):
    ours = kl_tokens(tiny_chat, steering(tiny_chat), k)  # batched, left padded, under nnsight
    assert ours == pytest.approx(plain_kl_tokens(tiny_chat, OWN, steering(tiny_chat), k), abs=1e-5)
    assert ours > 1e-3


def test_kl_tokens_is_zero_for_the_baseline(tiny_chat):
    assert kl_tokens(tiny_chat, Edit(), 8) == pytest.approx(0.0, abs=1e-9)


def test_one_token_is_first_token_kl(tiny_chat):
    iv = steering(tiny_chat)
    answers = capability.baseline_answers(tiny_chat, OWN, 1, 2)
    base = last_logits(tiny_chat, HARMLESS, Edit(), 2)
    m = capability.measure(tiny_chat, iv, [OWN[0]], OWN, HARMLESS, base, 2, answers)
    assert m["kl_tokens"][0] == pytest.approx(m["first_token_kl"][0], abs=1e-5)
    assert m["kl_tokens"][1] == len(OWN)


def test_positions_stop_at_the_answer_end(tiny_chat):
    # k positions for a long answer, 1 + its length for a short one, 1 for an empty one
    logits = answer_logits(tiny_chat, OWN, Edit(), 2, 4)
    short = len(tiny_chat.tok(ANSWERS[1], add_special_tokens=False)["input_ids"])
    assert [t.shape[0] for t in logits] == [4, 1 + min(3, short), 1]


def test_kl_tokens_setting_is_validated():
    assert Capability().kl_tokens == 8
    for bad in (0, -1, 10_000):
        with pytest.raises(ValueError):
            Capability(kl_tokens=bad)
