from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import generate
from pipeline.config import Capability, Generation
from pipeline.specs import Cell, ModelSpec, from_params

with job(snakemake) as p:
    cell = from_params(Cell, p.cell)
    inp = snakemake.input
    plan = generate.plan_cell(cell, p.intervention, selected_path=inp.direction[0] if inp.direction else None,
                              picks_path=inp.picks[0] if inp.picks else None,
                              candidates_path=inp.candidates[0] if inp.candidates else None)
    gen = from_params(Generation, p.generation)
    generate.run(from_params(ModelSpec, p.model), inp.model, inp.prompts, plan, snakemake.output.generations,
                 max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, device=p.device,
                 threads=snakemake.threads, exp_file=p.file, capability_out=snakemake.output.capability,
                 capability_cfg=from_params(Capability, p.capability),
                 baseline_path=inp.baseline[0] if inp.baseline else None, nll_prompts=p.nll_prompts)
