from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import directions

with job(snakemake) as p:
    directions.run(snakemake.wildcards.model, snakemake.input[0], snakemake.output[0], method=p.method,
                   settings=p.method_settings, filter_prompts=p.filter, exp_file=p.file)
