"""Several cells in one generate job give, token for token, what each cell gives in a job of its own."""

import polars as pl
import torch

from pipeline import generate, prompts
from pipeline.config import Capability, load_experiment
from pipeline.schemas import write_parquet


def _plans():
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4
    steer = dict(source="self", direction=direction, direction_model="tiny-chat", extraction_layer=1,
                 extraction_position=-1)
    return [generate.CellPlan(source="none", kind="baseline", cell="baseline"),
            generate.CellPlan(kind="ablation", cell="ablation", **steer),
            generate.CellPlan(kind="orthogonalization", cell="orthogonalization", **steer),
            generate.CellPlan(kind="addition", cell="addition_4", addition_layer=1, coefficient=4.0, **steer)]


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
    texts = {}
    for p in plans:
        job, alone = (pl.read_parquet(tmp_path / f"{w}-{p.cell}.parquet") for w in ("job", "alone"))
        assert job.equals(alone), p.cell
        assert pl.read_parquet(tmp_path / f"job-cap-{p.cell}.parquet").equals(
            pl.read_parquet(tmp_path / f"alone-cap-{p.cell}.parquet")), p.cell
        texts[p.cell] = job["completion"].to_list()
    # the cells differ from each other (so the comparison could fail), and the weight edit is undone
    # between cells: orthogonalisation equals activation ablation, and the baseline is unchanged
    assert texts["addition_4"] != texts["baseline"] and texts["ablation"] != texts["baseline"]
    assert texts["orthogonalization"] == texts["ablation"]
