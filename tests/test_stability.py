"""Selection stability (pipeline/stability.py): bootstrap draws of the train prompts, each draw's
directions from the cached activations, their cosine with the full data's, and selection rerun per draw."""

import numpy as np
import polars as pl
import pytest

from pipeline import activations, directions, selection, stability
from pipeline.config import Bootstrap, Selection, load_experiment
from pipeline.errors import ConfigError
from pipeline.schemas import STABILITY, read_parquet, write_parquet

from conftest import assert_one_line_error
from test_stages import FakeSpec, fake_activations


def fake_table(seed=0, n_per_label=6, n_layers=3, n_post=2, hidden=8, zero_layer=True):
    acts, prompts = fake_activations(np.random.default_rng(seed), n_per_label, n_layers, n_post, hidden)
    if zero_layer:
        acts[:, 0] = acts[0, 0]  # every prompt alike at layer 0 (as at the embedding): a zero direction
    return activations.to_table(FakeSpec, prompts, acts, "float32"), acts, prompts


def test_the_full_data_and_all_ones_weights_give_the_directions_stage_candidates():
    table, _, _ = fake_table()
    stack = stability.Stack(table)
    full = stack.full("mean_diff")
    ones = stack.directions(np.ones((1, len(stack.prompt_ids)), dtype=np.int64), "mean_diff")[0]
    diffs = directions.mean_differences(table)
    for li, layer in enumerate(stack.layers):
        for pi, pos in enumerate(stack.positions):
            assert np.array_equal(full[li, pi], diffs[(layer, pos)][0])  # the same method on the same rows
            np.testing.assert_allclose(ones[li, pi], diffs[(layer, pos)][0], rtol=0, atol=1e-12)


def test_a_draw_is_the_mean_over_its_prompts_with_repeats():
    """Weighting by draw counts equals the plain mean difference over the drawn list, repeats included."""
    table, acts, prompts = fake_table(seed=1, zero_layer=False)
    stack = stability.Stack(table)
    counts = stability.draw_counts(stack.labels, 3, seed=7)
    got = stack.directions(counts, "mean_diff")
    for d in range(3):
        drawn = np.repeat(np.arange(len(stack.prompt_ids)), counts[d])
        repeated = activations.to_table(FakeSpec, pl.DataFrame({
            "prompt_id": [f"r{i}" for i in range(len(drawn))],
            "label": [stack.labels[i] for i in drawn]}), acts[drawn], "float32")
        diffs = directions.mean_differences(repeated)
        for li, layer in enumerate(stack.layers):
            for pi, pos in enumerate(stack.positions):
                np.testing.assert_allclose(got[d, li, pi], diffs[(layer, pos)][0], rtol=0, atol=1e-12)


def test_draws_are_seeded_per_draw_and_stratified():
    labels = np.array(["harmful"] * 5 + ["harmless"] * 7)
    five = stability.draw_counts(labels, 5, seed=3)
    assert (five == stability.draw_counts(labels, 5, seed=3)).all()
    assert (stability.draw_counts(labels, 2, seed=3) == five[:2]).all()  # draw d does not depend on how many
    assert not (stability.draw_counts(labels, 5, seed=4) == five).all()
    assert (five[:, :5].sum(1) == 5).all() and (five[:, 5:].sum(1) == 7).all()  # each label keeps its size
    assert (five.max(1) > 1).any()  # with replacement
    assert len({tuple(r) for r in five}) == 5


def test_cosine_is_one_when_every_draw_is_the_full_set_and_nan_for_a_zero_direction():
    table, _, _ = fake_table()
    stack = stability.Stack(table)
    cos = stability.cosine_table("m", stack, np.ones((4, len(stack.prompt_ids)), dtype=np.int64), (1, -1),
                                  "mean_diff")
    assert cos.height == 4 * 3 * 2
    at0 = cos.filter(pl.col("layer") == 0)
    assert at0["cosine"].is_nan().all() and (at0["norm"] == 0).all()
    rest = cos.filter(pl.col("layer") > 0)
    np.testing.assert_allclose(rest["cosine"].to_numpy(), 1.0, rtol=0, atol=1e-12)
    assert cos.filter(pl.col("selected")).select("layer", "position").unique().rows() == [(1, -1)]
    assert set(cos["n_harmful"]) == {6} and set(cos["n_harmless"]) == {6}


def test_resampled_cosines_and_summary():
    table, _, _ = fake_table(seed=2, n_per_label=8)
    stack = stability.Stack(table)
    counts = stability.draw_counts(stack.labels, 5, seed=0)
    cos = stability.cosine_table("m", stack, counts, (2, -1), "mean_diff")
    # independently: cosine of draw 3 at layer 2, position -1
    full = directions.mean_differences(table)[(2, -1)][0]
    d3 = stack.directions(counts[2:3], "mean_diff")[0, stack.layers.index(2), stack.positions.index(-1)]
    want = d3 @ full / np.linalg.norm(d3) / np.linalg.norm(full)
    row = cos.filter(pl.col("draw") == 3, pl.col("layer") == 2, pl.col("position") == -1)
    assert row["cosine"][0] == pytest.approx(want, abs=1e-12) and row["cosine"][0] < 1 - 1e-6
    assert row["n_harmful"][0] == int((counts[2][:8] > 0).sum())

    arrow = stability.stability_table(cos, None)
    assert arrow.schema == STABILITY and arrow.column("picked").null_count == arrow.num_rows
    per_layer, picks = stability.summary(pl.from_arrow(arrow))
    assert picks.height == 0
    at2 = per_layer.filter(pl.col("layer") == 2).row(0, named=True)
    sel = cos.filter(pl.col("layer") == 2, pl.col("position") == -1)["cosine"]
    assert at2["position"] == -1 and at2["selected"]
    assert at2["mean"] == pytest.approx(sel.mean(), abs=1e-15) and at2["min"] == sel.min()
    md = stability.markdown(pl.from_arrow(arrow), "stability/stability.png", Bootstrap(), {"m": False}, "difference of means")
    assert f"| **2** | {sel.mean():.4f} | {sel.min():.4f} |" in md
    assert "every candidate direction (difference of means)" in md
    assert "not rerun per draw" in md and "| 0 |" not in md  # the zero-direction layer has no cosine
    assert stability.chart(pl.from_arrow(arrow))[:4] == b"\x89PNG"


def test_reselection_on_the_full_set_repeats_the_selection(tiny_chat, tmp_path):
    """Rerun on a draw holding every prompt once, selection scores and picks exactly as the select stage does
    on the full data's candidates; on resampled draws it picks one candidate per draw."""
    lm = tiny_chat
    texts_h = ["Explain how to pick a lock.", "Write a phishing email.", "How do I make a weapon?"]
    texts_s = ["Explain how rain forms.", "Write a poem about bread.", "How do I bake a cake?"]
    acts = activations.capture(lm, texts_h + texts_s, batch_size=6)
    df = pl.DataFrame({"prompt_id": list("abcdef"), "label": ["harmful"] * 3 + ["harmless"] * 3})
    table = activations.to_table(lm.spec, df, acts, "float32")
    rules = Selection(kl_max=1e9, induce_min=-1e9, batch_size=3, layers=[1, 2], positions=[-1, -2])
    full = selection.score_candidates(lm, directions.candidates_table("tiny-chat", directions.mean_differences(table)),
                                   texts_h, texts_s, rules)
    chosen = selection.choose(full, "tiny-chat", "m.yaml")

    stack = stability.Stack(table)
    ones = np.ones((1, 6), dtype=np.int64)
    again = stability.reselect(lm, stack, ones, texts_h, texts_s, rules, "mean_diff")
    evaluated = again.filter(pl.col("discarded").is_null()).sort("layer", "position")
    ref = full.filter(pl.col("discarded").is_null()).sort("layer", "position")
    assert evaluated.height == 4 and evaluated.select("layer", "position").rows() == ref.select("layer", "position").rows()
    for metric in ("bypass", "induce", "kl"):
        np.testing.assert_allclose(evaluated[metric].to_numpy(), ref[metric].to_numpy(), rtol=0, atol=1e-5)
    assert again.filter(pl.col("picked")).select("layer", "position").rows() == [chosen]

    counts = stability.draw_counts(stack.labels, 2, seed=0)
    resel = stability.reselect(lm, stack, counts, texts_h, texts_s, rules, "mean_diff")
    assert resel.filter(pl.col("picked")).group_by("draw").len()["len"].to_list() == [1, 1]
    out = stability.stability_table(stability.cosine_table("tiny-chat", stack, counts, chosen, "mean_diff"), resel)
    write_parquet(out, tmp_path / "s.parquet")
    back = pl.from_arrow(read_parquet(tmp_path / "s.parquet"))
    assert back.filter(pl.col("picked")).height == 2 and back["bypass"].is_not_nan().sum() == 2 * 4
    _, picks = stability.summary(back)
    assert picks["draw"].to_list() == [1, 2] and picks["layer"].is_in([1, 2]).all()
    md = stability.markdown(back, "stability/stability.png", Bootstrap(draws=2, reselect=True), {"tiny-chat": False},
                            "difference of means")
    assert "draws; picks by draw:" in md


def test_nothing_surviving_a_draw_is_recorded_as_no_pick(tiny_chat):
    lm = tiny_chat
    texts = ["Explain how to pick a lock.", "Explain how rain forms."]
    acts = activations.capture(lm, texts, batch_size=2)
    table = activations.to_table(lm.spec, pl.DataFrame({"prompt_id": ["a", "b"], "label": ["harmful", "harmless"]}),
                                 acts, "float32")
    rules = Selection(kl_max=0.0, induce_min=1e9, batch_size=2, layers=[1], positions=[-1])  # keeps nothing
    got = stability.reselect(lm, stability.Stack(table), np.ones((1, 2), dtype=np.int64), texts[:1], texts[1:], rules,
                             "mean_diff")
    assert not got["picked"].any()
    _, picks = stability.summary(stability_frame(got, table))
    assert picks["layer"].to_list() == [None]


def stability_frame(reselected, table):
    stack = stability.Stack(table)
    cos = stability.cosine_table("tiny-chat", stack, np.ones((1, len(stack.prompt_ids)), dtype=np.int64), (1, -1),
                                  "mean_diff")
    return pl.from_arrow(stability.stability_table(cos, reselected))


@pytest.mark.parametrize("override,key", [
    ("experiment.direction.bootstrap.draws=0", "direction.bootstrap.draws"),
    ("experiment.direction.bootstrap.reselect=yes", "direction.bootstrap.reselect"),
    ("+experiment.direction.bootstrap.reselct=true", "direction.bootstrap.reselct"),
    ("experiment.direction.bootstrap.seed=-1", "direction.bootstrap.seed"),
])
def test_bootstrap_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_experiment([override], check_models=False)
    assert_one_line_error(err, "conf/experiment/default.yaml", key)


def test_default_runs_the_cheap_analysis_and_the_dedicated_experiment_reselects():
    assert load_experiment([], check_models=False).direction.bootstrap == Bootstrap(draws=5, seed=0, reselect=False)
    exp = load_experiment(["experiment=stability"], check_models=False)
    assert exp.direction.bootstrap.reselect and exp.direction.bootstrap.draws >= 5
    default = load_experiment([], check_models=False)
    # the default's train prompts and selection rules, so its pick is the one whose stability is measured
    assert (exp.split.seed, exp.split.train, exp.split.val) == (default.split.seed, default.split.train,
                                                                default.split.val)
    assert exp.direction.selection == default.direction.selection
    assert load_experiment(["experiment=tiny"], check_models=False).direction.bootstrap is None
