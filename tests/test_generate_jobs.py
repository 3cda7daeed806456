"""Several cells in one generate job give, token for token, what each cell gives in a job of its own."""

import polars as pl
import torch

from pipeline import generate, prompts
from pipeline.config import Capability, load_experiment
from pipeline.interventions import Edit, make_edit
from pipeline.schemas import write_parquet


def _plans():
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    steer = dict(source="self", direction_model="tiny-chat", extraction_layer=1, extraction_position=-1)
    return [generate.CellPlan(source="none", edit=Edit(), cell="baseline"),
            generate.CellPlan(edit=make_edit("ablation", direction=direction), cell="ablation", **steer),
            generate.CellPlan(edit=make_edit("orthogonalization", direction=direction), cell="orthogonalization",
                              **steer),
            generate.CellPlan(edit=make_edit("addition", direction=direction, layer=1, coefficient=4.0),
                              cell="addition_4", **steer)]


def assert_same_files(tmp_path, plans, ours: str, theirs: str) -> dict[str, list[str]]:
    """Each cell's generations and capability files written under prefix `ours` equal those under
    `theirs`; the completions per cell."""
    texts = {}
    for p in plans:
        a, b = (pl.read_parquet(tmp_path / f"{w}-{p.cell}.parquet") for w in (ours, theirs))
        assert a.equals(b), p.cell
        assert pl.read_parquet(tmp_path / f"{ours}-cap-{p.cell}.parquet").equals(
            pl.read_parquet(tmp_path / f"{theirs}-cap-{p.cell}.parquet")), p.cell
        texts[p.cell] = a["completion"].to_list()
    return texts


def test_cells_sharing_a_job_match_cells_alone(tiny_dirs, tmp_path):
    exp = load_experiment(["experiment=tiny"])
    write_parquet(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file), tmp_path / "prompts.parquet")
    common = dict(max_new_tokens=5, batch_size=3, device="cpu", threads=1, exp_file=exp.file, nll_prompts=2,
                  capability_cfg=Capability(n=3))
    args = (exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"]), str(tmp_path / "prompts.parquet"))
    plans = _plans()
    # together, the baseline listed last: the job still runs it first, as the others read its answers
    together = [(p, str(tmp_path / f"job-{p.cell}.parquet"), str(tmp_path / f"job-cap-{p.cell}.parquet"))
                for p in plans[1:] + plans[:1]]
    generate.run_cells(*args, together, **common)
    alone_baseline = str(tmp_path / "alone-baseline.parquet")
    for p in plans:
        generate.run(*args, p, str(tmp_path / f"alone-{p.cell}.parquet"),
                     capability_out=str(tmp_path / f"alone-cap-{p.cell}.parquet"),
                     baseline_path=None if p.kind == "baseline" else alone_baseline, **common)
    texts = assert_same_files(tmp_path, plans, "job", "alone")
    # the cells differ from each other (so the comparison could fail), and the weight edit is undone
    # between cells: orthogonalisation equals activation ablation, and the baseline is unchanged
    assert texts["addition_4"] != texts["baseline"] and texts["ablation"] != texts["baseline"]
    assert texts["orthogonalization"] == texts["ablation"]


def test_passes_put_the_baseline_first_and_orthogonalisation_alone():
    plans = _plans()  # baseline, ablation, orthogonalization, addition_4
    harmless_only = generate.CellPlan(source="sweep", cell="best1", labels=("harmless",),
                                      edit=make_edit("addition", direction=plans[1].edit.direction, layer=1,
                                                     coefficient=2.0))
    listed = [plans[3], plans[2], harmless_only, plans[1], plans[0]]
    assert generate.plan_passes(listed, 8) == [[4, 0, 3], [1], [2]]
    assert generate.plan_passes(listed, 2) == [[4, 0], [1], [2], [3]]
    assert generate.plan_passes(listed, 1) == [[4], [0], [1], [2], [3]]


def test_cells_sharing_a_pass_match_cells_alone(tiny_dirs, tmp_path):
    """Several cells as invokes of one generation: the same files as each cell run alone, and the
    cells differ from each other, so each invoke got its own edit and only its own rows."""
    exp = load_experiment(["experiment=tiny"])
    write_parquet(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file), tmp_path / "prompts.parquet")
    common = dict(max_new_tokens=6, batch_size=3, device="cpu", threads=1, exp_file=exp.file, nll_prompts=2,
                  capability_cfg=Capability(n=3))
    args = (exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"]), str(tmp_path / "prompts.parquet"))
    direction = _plans()[1].edit.direction
    steer = dict(source="self", direction_model="tiny-chat", extraction_layer=1, extraction_position=-1)
    plans = _plans() + [generate.CellPlan(edit=make_edit("addition", direction=direction, layer=layer,
                                                         coefficient=c), cell=f"addition_{c:g}", **steer)
                        for layer, c in ((0, -3.0), (1, 8.0))]
    out = {w: [(p, str(tmp_path / f"{w}-{p.cell}.parquet"), str(tmp_path / f"{w}-cap-{p.cell}.parquet"))
               for p in plans] for w in ("pass", "alone")}
    generate.run_cells(*args, out["pass"], cells_per_pass=4, **common)
    generate.run_cells(*args, out["alone"], cells_per_pass=1, **common)
    texts = {cell: tuple(t) for cell, t in assert_same_files(tmp_path, plans, "pass", "alone").items()}
    assert len(set(texts.values())) == len(plans) - 1  # all differ but orthogonalisation == ablation
    assert texts["orthogonalization"] == texts["ablation"]


def test_generate_many_equals_generate_per_intervention(tiny_dirs):
    from pipeline.interventions import Edit, make_edit
    from pipeline.models import LoadedModel

    exp = load_experiment(["experiment=tiny"])
    lm = LoadedModel(exp.models["tiny-chat"], tiny_dirs["tiny-chat"], device="cpu", threads=1)
    direction = _plans()[1].edit.direction.float()
    ivs = [make_edit("addition", direction=direction, layer=1, coefficient=4.0), Edit(),
           make_edit("ablation", direction=direction, layers=(1, 2)),
           make_edit("addition", direction=direction, layer=0, coefficient=-2.0, form="every_write")]
    texts = ["Write a poem.", "How do I bake bread at home?", "Name a colour.", "Explain gravity briefly, please."]
    together = generate.generate_many(lm, texts, ivs, max_new_tokens=7, batch_size=3)
    for iv, (got_texts, got_ids) in zip(ivs, together):
        want_texts, want_ids = generate.generate(lm, texts, iv, max_new_tokens=7, batch_size=3, return_ids=True)
        assert got_ids == want_ids and got_texts == want_texts, iv.kind
    assert len({tuple(map(tuple, ids)) for _, ids in together}) == len(ivs)


def test_an_edit_past_the_last_block_is_one_line_before_loading(tiny_dirs):
    """A partner's layer plus the offset can leave the model: named before any weight loads; the baseline and
    an in-range addition pass."""
    import pytest

    from pipeline.errors import ConfigError

    exp = load_experiment(["experiment=tiny"])
    spec, where = exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"])
    direction = _plans()[1].edit.direction
    for plan in _plans():
        generate.check_edit_layers(plan, where, spec, exp.file)
    past = generate.CellPlan(source="tiny-base", cell="addition_4", direction_model="tiny-base", extraction_layer=3,
                             edit=make_edit("addition", direction=direction, layer=9, coefficient=4.0))
    with pytest.raises(ConfigError) as err:
        generate.check_edit_layers(past, where, spec, exp.file)
    assert "addition layer 9 is outside 0..3 in tiny-chat" in str(err.value) and "\n" not in str(err.value)


def test_selection_rules_naming_one_candidate_are_generated_once_and_written_under_each_name(tiny_dirs, tmp_path,
                                                                                             monkeypatch):
    """auto and cosmic_kl0.4 pick the same candidate: one generation, two files that differ only in the cell name,
    each equal to the pick generated alone; a pick of another candidate is generated apart."""
    exp = load_experiment(["experiment=tiny"])
    write_parquet(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file), tmp_path / "prompts.parquet")
    common = dict(max_new_tokens=4, batch_size=4, device="cpu", threads=1, exp_file=exp.file, nll_prompts=2,
                  capability_cfg=Capability(n=3), cells_per_pass=1)
    args = (exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"]), str(tmp_path / "prompts.parquet"))
    baseline, *_ = _plans()
    gen = torch.Generator().manual_seed(5)
    at = {1: torch.randn(64, generator=gen, dtype=torch.float64) * 4,
          2: torch.randn(64, generator=gen, dtype=torch.float64) * 4}

    def pick(name, layer):
        return generate.CellPlan(source="rule", edit=make_edit("ablation", direction=at[layer].clone()), cell=name,
                                 direction_model="tiny-chat", extraction_layer=layer, extraction_position=-1)

    plans = [baseline, pick("auto", 1), pick("cosmic", 2), pick("cosmic_kl0.4", 1)]
    assert generate.same_pick_as([(p, "", None) for p in plans]) == {3: 1}
    passes = []
    real = generate.generate_many
    monkeypatch.setattr(generate, "generate_many", lambda lm, instr, ivs, *a, **k: passes.append(len(ivs)) or
                        real(lm, instr, ivs, *a, **k))
    cells = [(p, str(tmp_path / f"job-{p.cell}.parquet"), str(tmp_path / f"job-cap-{p.cell}.parquet")) for p in plans]
    generate.run_cells(*args, cells, **common)
    assert passes == [1, 1, 1]  # the baseline, auto, cosmic: cosmic_kl0.4 is auto's
    monkeypatch.undo()
    alone = str(tmp_path / "alone-cosmic_kl0.4.parquet")
    generate.run(*args, plans[3], alone, capability_out=str(tmp_path / "alone-cap-cosmic_kl0.4.parquet"),
                 baseline_path=str(tmp_path / "job-baseline.parquet"), **{k: v for k, v in common.items()
                                                                           if k != "cells_per_pass"})
    copy, first = (pl.read_parquet(tmp_path / f"job-{c}.parquet") for c in ("cosmic_kl0.4", "auto"))
    assert copy.equals(pl.read_parquet(alone))
    assert set(copy["cell"]) == {"cosmic_kl0.4"} and copy.drop("cell").equals(first.drop("cell"))
    assert pl.read_parquet(tmp_path / "job-cap-cosmic_kl0.4.parquet").drop("cell").equals(
        pl.read_parquet(tmp_path / "job-cap-auto.parquet").drop("cell"))
    assert copy["completion"].to_list() != pl.read_parquet(tmp_path / "job-cosmic.parquet")["completion"].to_list()
