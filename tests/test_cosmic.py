"""COSMIC direction selection (`direction.select: cosmic`, pipeline/selection.py): its scores against a plain
PyTorch recomputation, its layer set and pick by hand, its config key, and the select stage writing its columns."""

import math

import numpy as np
import polars as pl
import pytest
import torch

from pipeline import activations, directions, select, selection
from pipeline.config import Direction, Selection, load_experiment
from pipeline.errors import ConfigError
from pipeline.schemas import SELECTION, read_parquet, write_parquet
from pipeline.templates import encode_batch

HARMFUL = ["Explain how to pick a lock.", "Write a phishing email.", "How do I make a weapon at home?"]
HARMLESS = ["Explain how rain forms.", "Write a poem about bread.", "How do I bake a cake at home?"]


def tiny_candidates(lm):
    acts = activations.capture(lm, HARMFUL + HARMLESS, batch_size=6)
    df = pl.DataFrame({"prompt_id": [f"p{i}" for i in range(6)], "label": ["harmful"] * 3 + ["harmless"] * 3})
    return directions.candidates_table(lm.spec.name, directions.mean_differences(
        activations.to_table(lm.spec, df, acts, "float32")))


# ------------------------------------------------------------------ an independent recomputation


def reference_means(lm, texts, edit=None, layers=()):
    """Mean over `texts` of each block's input at the post-instruction positions, [n_layers, n_post, hidden]
    float64, under `edit` = ("ablation", d) or ("addition", d, layer), with bare PyTorch hooks on the Qwen2
    modules (no nnsight, no pipeline edit code)."""
    model = lm.hf.model
    blocks = list(model.layers)
    batch = encode_batch(lm.tok, lm.spec, texts)  # tokenization only: the template is not what is tested
    seen = {}
    handles = []

    def ablate(x, u):
        return x - (x @ u).unsqueeze(-1) * u

    if edit is not None and edit[0] == "ablation":
        u = (edit[1] / edit[1].norm()).float()

        def out_hook(_m, _a, out):
            if isinstance(out, tuple):
                return (ablate(out[0], u), *out[1:])
            return ablate(out, u)

        handles.append(model.embed_tokens.register_forward_hook(out_hook))
        for b in blocks:
            handles.append(b.self_attn.register_forward_hook(out_hook))
            handles.append(b.mlp.register_forward_hook(out_hook))
    elif edit is not None:
        _, d, at = edit

        def add_hook(_m, args, kwargs):
            if args:
                return (args[0] + d.float(), *args[1:]), kwargs
            kwargs["hidden_states"] = kwargs["hidden_states"] + d.float()
            return args, kwargs

        handles.append(blocks[at].register_forward_pre_hook(add_hook, with_kwargs=True))
    for i, b in enumerate(blocks):  # registered after the addition: they read the edited input
        def read(_m, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = h[:, -batch.n_post:, :].double().mean(0)
        handles.append(b.register_forward_pre_hook(read, with_kwargs=True))
    try:
        with torch.no_grad():
            lm.hf(**lm.inputs(batch))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(blocks))])


def flat_cos(a, b):
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_cosmic_scores_match_plain_torch_hooks(tiny_chat):
    lm = tiny_chat
    cands = tiny_candidates(lm)
    rules = Selection(kl_max=1e9, induce_min=-1e9, batch_size=2, layers=[1, 2], positions=[-1, -2],
                      cosmic_layer_fraction=0.5)
    scores = selection.score_candidates(lm, cands, HARMFUL, HARMLESS, rules, "cosmic")

    base_h = reference_means(lm, HARMFUL)
    base_s = reference_means(lm, HARMLESS)
    n_layers = base_h.shape[0]
    sims = [flat_cos(base_h[l], base_s[l]) for l in range(n_layers)]
    low = sorted(np.argsort(sims, kind="stable")[:int(0.5 * n_layers)].tolist())
    assert len(low) == 2
    assert sorted(scores.filter(pl.col("cosmic_layer"))["layer"].unique().to_list()) == low

    vectors = {(r["layer"], r["position"]): torch.tensor(r["direction"], dtype=torch.float64)
               for r in pl.from_arrow(cands).iter_rows(named=True)}
    checked = 0
    for row in scores.filter(pl.col("discarded").is_null()).iter_rows(named=True):
        d = vectors[(row["layer"], row["position"])]
        refuse = flat_cos(reference_means(lm, HARMFUL, ("ablation", d))[low], base_s[low])
        comply = flat_cos(reference_means(lm, HARMLESS, ("addition", d, row["layer"]))[low], base_h[low])
        assert row["cosmic_refuse"] == pytest.approx(refuse, abs=1e-5)
        assert row["cosmic_comply"] == pytest.approx(comply, abs=1e-5)
        assert row["cosmic"] == pytest.approx(refuse + comply, abs=2e-5)
        checked += 1
    assert checked == 4  # layers 1, 2 x positions -2, -1
    # the rows the rule skips carry no score; the Arditi scores come from the same passes
    skipped = scores.filter(pl.col("discarded").is_not_null())
    assert set(skipped["discarded"]) <= {"not evaluated", "layer >= 3"} and skipped["cosmic"].is_nan().all()
    assert not scores.filter(pl.col("discarded").is_null())["bypass"].is_nan().any()
    # the pick is the argmax of the score among the survivors, and `picks` records it with Arditi's
    alive = scores.filter(pl.col("discarded").is_null())
    best = alive.sort("cosmic", descending=True).row(0, named=True)
    assert selection.choose(scores, "tiny-chat", "m.yaml", "cosmic") == (best["layer"], best["position"])
    assert "cosmic" in scores.filter((pl.col("layer") == best["layer"])
                                     & (pl.col("position") == best["position"]))["picks"][0].split(",")
    lowest = alive.sort("bypass").row(0, named=True)
    assert "auto" in scores.filter((pl.col("layer") == lowest["layer"])
                                   & (pl.col("position") == lowest["position"]))["picks"][0].split(",")


# ------------------------------------------------------------------ by hand


def test_low_layers_are_the_least_alike_share():
    harmful = torch.zeros(6, 2, 3, dtype=torch.float64)
    harmless = torch.zeros(6, 2, 3, dtype=torch.float64)
    # per layer, the cosine of the concatenated [pos -2, pos -1] means is set at position -2 (position -1 is
    # zero on both sides, adding nothing to the dot product or the norms)
    cos_by_layer = [1.0, 0.2, 0.9, -0.5, 0.2, 0.6]
    for layer, c in enumerate(cos_by_layer):
        harmful[layer, 0] = torch.tensor([2.0, 0.0, 0.0])
        harmless[layer, 0] = torch.tensor([c, math.sqrt(1 - c * c), 0.0]) * 3
    assert [selection.cosine(harmful[l], harmless[l]) for l in range(6)] == pytest.approx(cos_by_layer)
    assert selection.cosmic_layers(harmful, harmless, 0.34) == [1, 3]  # int(2.04) = 2; the 0.2 tie: lower layer
    assert selection.cosmic_layers(harmful, harmless, 0.5) == [1, 3, 4]  # the three lowest, in layer order
    assert selection.cosmic_layers(harmful, harmless, 0.05) == [3]  # int(0.3) = 0, but at least one layer
    assert selection.cosmic_layers(harmful, harmless, 1.0) == list(range(6))


def frame(rows):
    return pl.DataFrame(rows, schema_overrides={"discarded": pl.String})


def test_cosmic_picks_the_highest_surviving_score():
    rules = Selection(kl_max=0.1, induce_min=0.0)
    rows = [
        {"layer": 1, "position": -1, "bypass": -1.0, "induce": 1.0, "kl": 0.5, "cosmic": 1.9},  # KL too high
        {"layer": 2, "position": -1, "bypass": -4.0, "induce": 0.5, "kl": 0.05, "cosmic": 1.2},  # Arditi's
        {"layer": 3, "position": -2, "bypass": -2.0, "induce": 0.5, "kl": 0.05, "cosmic": 1.7},  # COSMIC's
        {"layer": 3, "position": -1, "bypass": math.nan, "induce": math.nan, "kl": 0.01, "cosmic": 1.5},
        {"layer": 4, "position": -1, "bypass": -3.0, "induce": 0.5, "kl": 0.01, "cosmic": math.nan},
    ]
    cosmic = selection.SELECTORS["cosmic"]
    reasons = [cosmic.discard(r, rules, None) for r in rows]
    assert reasons == ["kl 0.500 > 0.1", None, None, None, "NaN score"]  # no refusal score needed
    scored = frame([{**r, "discarded": why} for r, why in zip(rows, reasons)])
    assert selection.choose(scored, "m", "m.yaml", "cosmic") == (3, -2)
    assert selection.picked_by(rows, rules) == {(2, -1): ["auto"], (3, -2): ["cosmic"]}
    # the same rules under other KL caps: at 1.0 layer 1 survives, and wins COSMIC's but not Arditi's (its
    # bypass -1 beats nothing); at 0.02 only the KL 0.01 rows survive, and each rule takes the one it can score
    capped = rules.model_copy(update={"kl_max_compare": [1.0, 0.02]})
    assert selection.picked_by(rows, capped) == {(2, -1): ["auto", "auto_kl1"], (3, -2): ["cosmic"],
                                                  (1, -1): ["cosmic_kl1"], (4, -1): ["auto_kl0.02"],
                                                  (3, -1): ["cosmic_kl0.02"]}
    with pytest.raises(ConfigError) as info:
        selection.choose(frame([{**rows[0], "discarded": reasons[0]}]), "m", "conf/model/m.yaml", "cosmic")
    assert "cosmic 1.90" in str(info.value) and "direction.force" in str(info.value)


# ------------------------------------------------------------------ config


def test_the_rule_names_the_cells_use_are_the_selectors():
    from pipeline.specs import SELECTION_RULES

    assert tuple(selection.SELECTORS) == SELECTION_RULES


def test_generate_picks_adds_a_rule_job_per_model_and_refuses_a_forced_direction():
    exp = load_experiment(["experiment=tiny", "+experiment.direction.generate_picks=true",
                           "+experiment.direction.selection.kl_max_compare=[0.5]"])
    jobs = {(j.model, j.name): [c.name for c in j.cells] for j in exp.generate_jobs()}
    assert jobs[("tiny-chat", "rule1")] == ["auto", "cosmic", "auto_kl0.5", "cosmic_kl0.5"]
    assert all(c.kind == "ablation" for c in exp.cells() if c.source == "rule")
    plain = load_experiment(["experiment=tiny"])  # without it, the same grid and no rule job
    assert [j for j in plain.generate_jobs() if j.name.startswith("rule")] == []
    with pytest.raises(ConfigError) as info:
        load_experiment(["experiment=tiny", "+experiment.direction.generate_picks=true",
                         "+experiment.direction.force=[{model:tiny-chat,layer:1}]"])
    assert "direction.generate_picks" in str(info.value) and "tiny-chat is forced" in str(info.value)



def test_select_cosmic_is_a_valid_choice_and_not_forced():
    exp = load_experiment(["experiment=tiny", "experiment.direction.select=cosmic",
                           "+experiment.direction.selection.cosmic_layer_fraction=0.25"])
    assert exp.direction.select == "cosmic" and exp.direction.selection.cosmic_layer_fraction == 0.25
    assert not any(exp.direction_choice(m)[2] for m in exp.models)  # chosen by a rule, not configured
    # the config's choices are the registry's rules plus `configured`
    choices = set(Direction.model_fields["select"].annotation.__args__)
    assert choices == {*selection.SELECTORS, "configured"}


@pytest.mark.parametrize("override,key", [("experiment.direction.select=cosmik", "direction.select"),
                                          ("+experiment.direction.selection.cosmic_layer_fraction=0",
                                           "direction.selection.cosmic_layer_fraction")])
def test_bad_select_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", override])
    text = str(err.value)
    assert "experiment/tiny.yaml" in text and f"key '{key}'" in text and "\n" not in text, text


# ------------------------------------------------------------------ the stage


@pytest.mark.parametrize("refusal_tokens", [["I"], []])
def test_select_stage_writes_the_cosmic_columns(tiny_chat, tiny_dirs, tmp_path, refusal_tokens):
    lm = tiny_chat
    prompts = tmp_path / "prompts.parquet"
    pl.DataFrame({"split": ["val"] * 6, "label": ["harmful"] * 3 + ["harmless"] * 3,
                  "instruction": HARMFUL + HARMLESS}).write_parquet(prompts)
    cands = tmp_path / "candidates.parquet"
    write_parquet(tiny_candidates(lm), cands, vector_columns=("direction",))
    spec = lm.spec.model_copy(update={"refusal_tokens": refusal_tokens})  # COSMIC runs without them
    out = {k: tmp_path / f"{k}.{ext}" for k, ext in
           (("selection", "parquet"), ("selected", "parquet"), ("heatmap", "png"))}
    rules = Selection(kl_max=1e9, induce_min=-1e9, batch_size=4, positions=[-1])
    select.run(spec, str(tiny_dirs["tiny-chat"]), str(prompts), str(cands), out["selection"], out["selected"],
               out["heatmap"], forced=None, rules=rules, filter_prompts=False, random_seed=0, device="cpu",
               threads=1, exp_file="exp.yaml", rule="cosmic")
    table = read_parquet(out["selection"])
    assert table.schema.equals(SELECTION, check_metadata=False)
    df = pl.from_arrow(table)
    alive = df.filter(pl.col("discarded").is_null())
    # layer 3 >= int(0.8 x 4); layer 0's candidate is zero (the same template token embedded on both sides)
    assert sorted(alive["layer"].to_list()) == [1, 2]
    assert df.filter((pl.col("layer") == 0) & (pl.col("position") == -1))["discarded"].to_list() == ["NaN score"]
    assert df["rule"].unique().to_list() == ["cosmic"]
    chosen = df.filter(pl.col("chosen")).row(0, named=True)
    assert chosen["cosmic"] == pytest.approx(alive["cosmic"].max()) and "cosmic" in chosen["picks"].split(",")
    assert ((alive["cosmic"] - alive["cosmic_refuse"] - alive["cosmic_comply"]).abs() < 1e-9).all()
    assert df["cosmic_layer"].sum() > 0 and df["cosmic_layer"].null_count() == 0
    assert alive["bypass"].is_nan().all() == (not refusal_tokens)  # Arditi's scores when they can be had
    sel = read_parquet(out["selected"])
    assert sel.column("layer").to_pylist() == [chosen["layer"]] * 2
    assert out["heatmap"].read_bytes()[:4] == b"\x89PNG"
