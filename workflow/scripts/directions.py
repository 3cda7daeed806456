from pipeline import directions
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
directions.run(snakemake.wildcards.model, snakemake.input[0], snakemake.output[0],
               filter_prompts=exp.selection_settings()["filter"], exp_file=exp.file)
