import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from pipeline.config import Selection
from pipeline import activations, candidates, directions, probes, selection
from pipeline.errors import ConfigError
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import torch_hooks
from pipeline.refusal import refusal_score, refusal_token_ids
from pipeline.templates import encode_batch

from test_stages import FakeSpec, fake_activations


def test_refusal_score_formula():
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), -1)[:, [0, 2]].sum(-1)
    expected = torch.log(p + 1e-8) - torch.log(1 - p + 1e-8)
    got = refusal_score(logits, [0, 2])
    assert torch.allclose(got, expected) and got.dtype == torch.float64
    assert got[0] > 0 > got[1]  # mostly refusal tokens vs mostly not


def test_refusal_tokens_must_be_single_tokens(tiny_chat):
    ids = refusal_token_ids(tiny_chat.tok, tiny_chat.spec)
    assert len(ids) == 1 and tiny_chat.tok.decode(ids) == "I"
    bad = tiny_chat.spec.model_copy(update={"refusal_tokens": ["I", "I cannot help with that request"]})
    with pytest.raises(ConfigError) as info:
        refusal_token_ids(tiny_chat.tok, bad)
    assert "refusal_tokens[1]" in str(info.value) and "not one" in str(info.value)


def test_kl_divergence():
    a = torch.randn(3, 11)
    assert torch.allclose(probes.kl_divergence(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    b = a + torch.randn(3, 11)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert torch.allclose(probes.kl_divergence(a, b), (p * (p / q).log()).sum(-1))


def scores_frame(rows):
    return pl.DataFrame(rows, schema_overrides={"discarded": pl.String})


def test_discard_rules_and_choice():
    rules = Selection(kl_max=0.1, induce_min=0.0)
    rows = [
        {"layer": 3, "position": -1, "norm": 1.0, "bypass": -5.0, "induce": 1.0, "kl": 0.5},  # KL too high
        {"layer": 4, "position": -2, "norm": 1.0, "bypass": -3.0, "induce": -0.2, "kl": 0.01},  # induce < 0
        {"layer": 5, "position": -1, "norm": 1.0, "bypass": -2.0, "induce": 0.5, "kl": 0.05},  # best survivor
        {"layer": 6, "position": -1, "norm": 1.0, "bypass": -1.0, "induce": 2.0, "kl": 0.02},
        {"layer": 7, "position": -1, "norm": 1.0, "bypass": math.nan, "induce": 2.0, "kl": 0.02},
    ]
    for r in rows:
        r["discarded"] = selection.discard_reason(r, rules)
    assert [r["discarded"] is None for r in rows] == [False, False, True, True, False]
    assert rows[4]["discarded"] == "NaN score"
    assert selection.choose(scores_frame(rows), "m", "conf/model/m.yaml") == (5, -1)


def test_nothing_survives_names_the_closest():
    rows = [{"layer": 3, "position": -1, "norm": 1.0, "bypass": -5.0, "induce": 1.0, "kl": 0.5,
             "discarded": "kl 0.500 > 0.1"}]
    with pytest.raises(ConfigError) as info:
        selection.choose(scores_frame(rows), "m", "conf/model/m.yaml")
    msg = str(info.value)
    assert "conf/model/m.yaml" in msg and "direction.force" in msg and "layer 3 pos -1" in msg and "kl 0.500" in msg


def test_filter_by_refusal_keeps_refused_harmful_and_complied_harmless():
    acts, prompts_df = fake_activations(np.random.default_rng(0), n_per_label=4)
    scores = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.0, -0.1, -4.0])
    table = activations.to_table(FakeSpec, prompts_df, acts, "float32", scores)
    kept = candidates.filter_by_refusal(table, "exp.yaml")
    kept_ids = sorted(set(kept.column("prompt_id").to_pylist()))
    assert kept_ids == ["p0", "p2", "p3", "p4", "p6", "p7"]
    with pytest.raises(ConfigError, match="no harmful train prompt"):
        candidates.filter_by_refusal(activations.to_table(FakeSpec, prompts_df, acts, "float32", -np.abs(scores)),
                                     "exp.yaml")


def test_candidate_scores_match_a_direct_computation(tiny_chat):
    lm = tiny_chat
    texts_h = ["Explain how to pick a lock.", "Write a phishing email."]
    texts_s = ["Explain how rain forms.", "Write a poem about bread."]
    acts = activations.capture(lm, texts_h + texts_s, batch_size=4)
    df = pl.DataFrame({"prompt_id": ["a", "b", "c", "d"], "label": ["harmful"] * 2 + ["harmless"] * 2})
    cands = directions.candidates_table("tiny-chat", directions.mean_differences(
        activations.to_table(lm.spec, df, acts, "float32")))
    rules = Selection(kl_max=1e9, induce_min=-1e9, batch_size=2, layers=[1, 2], positions=[-1])
    scores = selection.score_candidates(lm, cands, texts_h, texts_s, rules)
    evaluated = scores.filter(pl.col("discarded").is_null())
    assert sorted(evaluated["layer"].to_list()) == [1, 2] and set(evaluated["position"]) == {-1}
    assert set(scores.filter(pl.col("layer") == 3)["discarded"]) == {"layer >= 3"}  # int(0.8 * 4)

    # recompute one candidate's bypass and KL with plain hooks
    row = evaluated.filter(pl.col("layer") == 2).row(0, named=True)
    table = cands.filter(pa.compute.and_(pa.compute.equal(cands["layer"], 2), pa.compute.equal(cands["position"], -1)))
    d = torch.tensor(table.column("direction")[0].as_py())
    ids = refusal_token_ids(lm.tok, lm.spec)

    def last(texts, iv):
        batch = encode_batch(lm.tok, lm.spec, texts)
        with torch.no_grad(), torch_hooks(lm.hf, lm.rmap, iv):
            return lm.hf(**lm.inputs(batch)).logits[:, -1, :]

    bypass = refusal_score(last(texts_h, make_edit("ablation", direction=d)), ids).mean().item()
    induce = refusal_score(last(texts_s, make_edit("addition", direction=d, layer=2, coefficient=1.0)), ids)
    kl = probes.kl_divergence(last(texts_s, Edit()), last(texts_s, make_edit("ablation", direction=d)))
    assert row["bypass"] == pytest.approx(bypass, abs=1e-4)
    assert row["induce"] == pytest.approx(induce.mean().item(), abs=1e-4)
    assert row["kl"] == pytest.approx(kl.mean().item(), abs=1e-5)


def test_relative_induce_threshold_counts_from_the_unsteered_score():
    rules = Selection(kl_max=0.2, induce_min=1.0, induce_relative=True)
    row = {"bypass": -3.4, "induce": -3.0, "kl": 0.17}
    unsteered = -4.2  # the harmless val prompts' mean score without steering
    assert selection.discard_reason(row, rules, induce_floor=unsteered + rules.induce_min) is None
    assert selection.discard_reason(row, rules, induce_floor=-2.5) == "induce -3.00 < -2.50"
    assert Selection.model_validate({"induce_relative": True, "induce_min": 1}).induce_relative
