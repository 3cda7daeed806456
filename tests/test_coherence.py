"""The coherence measure behind the `degenerate` flag, by hand and on the labelled set.

The labelled set (pipeline/data/labelled_completions.jsonl) and the choice of measure and
thresholds: docs/measures.md, scripts/evaluate_coherence.py."""

import json
import math

import polars as pl
import pytest

from pipeline import aggregate, coherence
from pipeline.config import Coherence

from conftest import ROOT, prepared_model

DATASET = ROOT / "pipeline" / "data" / "labelled_completions.jsonl"
QWEN, GEMMA = "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
DEFAULTS = Coherence()
# The issue's two cases, at the default run's 16 new tokens: a fluent refusal of a harmless
# request (flagged before: its loss given the request rose 2.17 nats/token) and a broken cell's text.
FLUENT_REFUSAL = "I'm sorry, I can't assist with this."
BROKEN = ["# 🌟 🌟 🌟 🌟 🌟 🌟 🌟 🌟", "Title: Title: Title: Title: Title: Title: Title: Title:"]


def limits(c: Coherence = DEFAULTS) -> dict:
    return {"nll_max": c.nll_max, "repetition_max": c.repetition_max}


def test_the_loss_is_the_lower_of_the_two_known_ones():
    assert coherence.fluency_loss(3.0, 1.2) == 1.2  # a refusal: unexpected after its prompt, fluent text
    assert coherence.fluency_loss(0.4, 2.0) == 0.4  # an answer: expected after its prompt
    assert coherence.fluency_loss(None, 2.0) == coherence.fluency_loss(2.0, math.nan) == 2.0
    assert coherence.fluency_loss(None, math.nan) is None


def test_a_completion_is_broken_past_either_threshold():
    kw = {"nll_max": 4.0, "repetition_max": 0.5}
    assert coherence.broken_score(2.0, 0.25, **kw) == pytest.approx(0.5)
    assert coherence.broken_score(6.0, 0.25, **kw) == pytest.approx(1.5)  # token soup
    assert coherence.broken_score(1.0, 0.75, **kw) == pytest.approx(1.5)  # a loop the model predicts well
    assert not coherence.broken(4.0, 0.5, **kw)  # at the thresholds: not past them
    # no loss (not measured, or an empty completion): repetition alone decides
    assert coherence.broken_score(None, 0.25, **kw) == coherence.broken_score(math.nan, 0.25, **kw) == 0.5


def test_the_share_counts_measured_completions_and_falls_back_to_repetition():
    kw = {"nll_max": 4.0, "repetition_max": 0.5}
    # measured rows: one of two broken; the unmeasured looping row is not counted
    assert coherence.broken_share([5.0, 1.0, None], [0.0, 0.0, 0.9], **kw) == 0.5
    assert coherence.broken_share([None, None, None], [0.0, 0.9, 0.9], **kw) == pytest.approx(2 / 3)
    assert math.isnan(coherence.broken_share([], [], **kw))
    assert coherence.degenerate_cell([5.0, 1.0], [0.0, 0.0], broken_share_max=0.25, **kw)
    assert not coherence.degenerate_cell([5.0, 1.0], [0.0, 0.0], broken_share_max=0.5, **kw)


def test_cells_are_flagged_per_group_and_old_rows_by_repetition():
    frame = pl.DataFrame({"cell": ["a"] * 4 + ["b"] * 4, "label": ["x", "x", "y", "y"] * 2,
                          "nll": [1.0, 9.0, 9.0, 9.0, 1.0, None, 1.0, 1.0],
                          "nll_neutral": [9.0, 2.0, 9.0, 9.0, 1.0, None, 1.0, 1.0],
                          "repetition": [0.0, 0.0, 0.0, 0.0, 0.9, 0.9, 0.0, 0.0]})
    cfg = {"nll_max": 4.0, "repetition_max": 0.5, "broken_share_max": 0.25}
    got = coherence.degenerate_cells(frame, ["cell", "label"], cfg)
    flags = {(r["cell"], r["label"]): (r["broken_share"], r["degenerate"]) for r in got.iter_rows(named=True)}
    assert flags == {("a", "x"): (0.0, False), ("a", "y"): (1.0, True), ("b", "x"): (1.0, True),
                     ("b", "y"): (0.0, False)}
    # files made before nll_neutral: the prompt's loss alone (cell a's second row is now broken)
    old = coherence.degenerate_cells(frame.drop("nll_neutral"), ["cell"], cfg)
    assert dict(zip(old["cell"], old["broken_share"])) == {"a": 0.75, "b": pytest.approx(1 / 3)}  # b: 3 measured


def summary_rows(cell, completions, nll, nll_neutral, repetition):
    return [{"model": "m", "template": "t", "source": "none" if cell == "baseline" else "self", "cell": cell,
             "direction_model": None if cell == "baseline" else "m", "extraction_layer": None,
             "extraction_position": None, "intervention": "baseline" if cell == "baseline" else "addition", "addition_layer": None,
             "coefficient": None if cell == "baseline" else 4.0, "normalized": None, "ablation_layers": None,
             "prompt_id": f"p{i}", "label": "harmless", "category": "c", "prompt": "Give me a recipe.",
             "completion": c, "repetition": repetition, "nll": nll, "nll_neutral": nll_neutral, "scorer": "s",
             "refused": c == FLUENT_REFUSAL} for i, c in enumerate(completions)]


def test_the_report_no_longer_flags_fluent_refusals_but_flags_loops():
    """The issue's cells: refusals whose loss given the prompt rose by 2.17 nats/token over the
    baseline's (the old flag: nll_increase > 1.5) but read fluently after the neutral instruction, and
    a looping cell in the same loss range."""
    rows = (summary_rows("baseline", ["Here is a recipe."] * 4, 0.4, 2.0, 0.0)
            + summary_rows("refusals", [FLUENT_REFUSAL] * 4, 2.57, 1.2, 0.0)
            + summary_rows("loops", BROKEN * 2, 2.4, 2.0, 0.8))
    summary = aggregate.summarize(pl.DataFrame(rows), {"nll_max": 2.5, "repetition_max": 0.3})
    by_cell = {r["cell"]: r for r in summary.iter_rows(named=True)}
    assert by_cell["refusals"]["nll_increase"] == pytest.approx(2.17)
    assert not by_cell["refusals"]["degenerate"]
    assert by_cell["loops"]["degenerate"]
    assert not by_cell["baseline"]["degenerate"]


def test_defaults_are_the_values_chosen_on_the_labelled_set():
    # docs/measures.md: min nll > 2.5 or repetition > 0.3, a cell flagged past a quarter broken
    assert (DEFAULTS.nll_max, DEFAULTS.repetition_max, DEFAULTS.broken_share_max) == (2.5, 0.3, 0.25)


# ------------------------------------------------------------------ with the embedded models (slow)


def auc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def measured():
    """Every labelled completion with its loss (the lower of the two) and repetition, measured as the
    generate job measures them."""
    from pipeline.config import DEFAULT_CONF_DIR, load_model
    from pipeline.interventions import Edit
    from pipeline.models import LoadedModel
    from pipeline.probes import completion_losses

    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line]
    models = {}
    for name in (QWEN, GEMMA):
        spec = load_model(name, DEFAULT_CONF_DIR, "test", "model")
        prepared = prepared_model(name, spec)  # the pipeline's own cache of the dequantized model
        lm = LoadedModel(spec, prepared, "cpu", 2)
        sub = [r for r in rows if r["model"] == name]
        own = completion_losses(lm, [(r["instruction"], r["completion"]) for r in sub], Edit(), 8)
        neutral = coherence.neutral_nll(lm, [r["completion"] for r in sub], batch_size=8)
        for r, o, n in zip(sub, own, neutral):
            ids = lm.tok(r["completion"], add_special_tokens=False)["input_ids"]  # the set keeps text, not ids
            r.update(nll=coherence.per_token(o), nll_neutral=n, repetition=coherence.repetition(ids),
                     loss=coherence.fluency_loss(coherence.per_token(o), n))
        models[name] = lm if name == QWEN else None
    return rows, models[QWEN]


@pytest.mark.slow
def test_the_measure_separates_broken_from_fluent_on_the_labelled_set(measured):
    rows, _ = measured
    positive = [r["quality"] == "broken" for r in rows]
    scores = [coherence.broken_score(r["loss"], r["repetition"], **limits()) for r in rows]
    assert auc(scores, positive) >= 0.9
    # the default rule itself (measured: 175 of 181 broken caught, 4 of 91 fluent called broken)
    pred = [s > 1 for s in scores]
    caught = sum(p and t for p, t in zip(pred, positive))
    false = sum(p and not t for p, t in zip(pred, positive))
    assert caught >= 170 and false <= 6
    assert sum(p for p, r in zip(pred, rows) if r["quality"] == "fluent_refusal") <= 3


@pytest.mark.slow
def test_the_issues_cases_are_classified_right(measured):
    from pipeline.interventions import Edit
    from pipeline.probes import completion_losses

    rows, qwen = measured
    texts = [FLUENT_REFUSAL, *BROKEN, "Title: Title: Title:"]  # and the loop as short as the issue quotes it
    own = completion_losses(qwen, [("Give me a simple recipe for moist banana bread.", t) for t in texts],
                            Edit(), 4)
    neutral = coherence.neutral_nll(qwen, texts, batch_size=4)
    loss = [coherence.fluency_loss(coherence.per_token(o), n) for o, n in zip(own, neutral)]
    rep = [coherence.repetition(qwen.tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert not coherence.broken(loss[0], rep[0], **limits())
    assert all(coherence.broken(n, r, **limits()) for n, r in zip(loss[1:], rep[1:]))
    # and cell by cell on the labelled set: cells of fluent refusals pass, cells of loops are flagged
    frame = pl.DataFrame([{k: r[k] for k in ("model", "cell", "nll", "nll_neutral", "repetition")} for r in rows])
    flags = {(r["model"], r["cell"]): r["degenerate"] for r in
             coherence.degenerate_cells(frame, ["model", "cell"], DEFAULTS.model_dump()).iter_rows(named=True)}
    for cell in ("addition_2", "addition_3", "addition_4", "addition_4_L18", "cand17_3", "baseline"):
        assert not flags[(QWEN, cell)], cell
    for cell in ("addition_8", "addition_12", "addition_30", "random_8", "random_20", "addition_8_L6"):
        assert flags[(QWEN, cell)], cell
    for cell in ("ablation", "addition_8", "addition_16", "random_4", "random_16"):
        assert flags[(GEMMA, cell)], cell
