"""The refusal scorers against the hand labels of pipeline/data/labelled_completions.jsonl.

Measured values (docs/measures.md, scripts/evaluate_coherence.py); a scorer that drops more than
the margin below them fails."""

import json

import pytest

from pipeline.config import DEFAULT_CONF_DIR, load_scorer
from pipeline.refusal_phrases import is_refusal

from conftest import ROOT, prepared_model

DATASET = ROOT / "pipeline" / "data" / "labelled_completions.jsonl"
# scorer: (accuracy, Cohen's kappa) measured on the 272 labelled completions
MEASURED = {
    "refusal-prefix": (0.985, 0.948),
    "refusal-substring": (0.989, 0.961),
    "base-models-prefix": (0.985, 0.948),
}
# the embedded Qwen judge; Llama Guard (judge-llama-guard) is gated on the hub and cannot run here
JUDGE_MEASURED = {"judge-qwen": (0.904, 0.717)}
MARGIN = {"accuracy": 0.02, "kappa": 0.05}


def rows():
    return [json.loads(line) for line in DATASET.read_text().splitlines() if line]


def accuracy(pred: list[bool], truth: list[bool]) -> float:
    return sum(p == t for p, t in zip(pred, truth)) / len(truth)


def cohen_kappa(pred: list[bool], truth: list[bool]) -> float:
    """Agreement beyond what the two label rates give by chance: (p_o - p_e) / (1 - p_e)."""
    n = len(truth)
    observed = accuracy(pred, truth)
    p, t = sum(pred) / n, sum(truth) / n
    expected = p * t + (1 - p) * (1 - t)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def test_kappa_of_known_tables():
    truth = [True] * 5 + [False] * 5
    assert cohen_kappa(truth, truth) == 1.0
    assert cohen_kappa([not t for t in truth], truth) == -1.0
    # 2x2 table (a=4, b=1, c=2, d=3): p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4
    pred = [True] * 4 + [False] + [True] * 2 + [False] * 3
    assert cohen_kappa(pred, truth) == pytest.approx(0.4)


def test_the_set_has_both_labels_in_both_models():
    data = rows()
    assert len(data) >= 150
    for model in ("qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        refused = [r["refused"] for r in data if r["model"] == model]
        assert any(refused) and not all(refused)


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_phrase_scorer_agrees_with_the_labels(name):
    data = rows()
    scorer = load_scorer(name, DEFAULT_CONF_DIR, "tests/test_scorer_agreement.py")
    pred = [is_refusal(r["completion"], scorer) for r in data]
    truth = [r["refused"] for r in data]
    acc, kappa = MEASURED[name]
    assert accuracy(pred, truth) >= acc - MARGIN["accuracy"]
    assert cohen_kappa(pred, truth) >= kappa - MARGIN["kappa"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JUDGE_MEASURED))
def test_judge_scorer_agrees_with_the_labels(name):
    from pipeline.judge import judge_refusals
    from pipeline.models import LoadedModel

    scorer = load_scorer(name, DEFAULT_CONF_DIR, "tests/test_scorer_agreement.py")
    prepared = prepared_model(scorer.judge.name, scorer.judge)
    data = rows()
    lm = LoadedModel(scorer.judge, prepared, "cpu", 2)
    pred = judge_refusals(lm, scorer, [r["instruction"] for r in data], [r["completion"] for r in data], 8)
    truth = [r["refused"] for r in data]
    acc, kappa = JUDGE_MEASURED[name]
    assert accuracy(pred, truth) >= acc - MARGIN["accuracy"]
    assert cohen_kappa(pred, truth) >= kappa - MARGIN["kappa"]
