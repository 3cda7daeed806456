from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import directions

with job(snakemake) as p:
    directions.run_other_methods(snakemake.wildcards.model, snakemake.input.activations, snakemake.input.selected,
                                 snakemake.output[0], methods=p.methods, filter_prompts=p.filter, exp_file=p.file)
