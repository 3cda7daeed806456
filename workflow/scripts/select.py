from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import select
from pipeline.config import Selection
from pipeline.specs import ModelSpec, from_params

with job(snakemake) as p:
    layer, position, forced = p.choice
    out = snakemake.output
    select.run(from_params(ModelSpec, p.model), snakemake.input.model, snakemake.input.prompts,
               snakemake.input.candidates, out.selection, out.selected, out.heatmap,
               forced=(layer, position) if forced else None, rules=from_params(Selection, p.selection),
               filter_prompts=p.filter, random_seed=p.random_seed, device=p.device, threads=snakemake.threads,
               exp_file=p.file, rule=p.select)
