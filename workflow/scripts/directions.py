from pipeline import directions
from pipeline.job import job

with job(snakemake) as p:
    directions.run(snakemake.wildcards.model, snakemake.input[0], snakemake.output[0], filter_prompts=p.filter,
                   exp_file=p.file)
