from pipeline import prompts
from pipeline.config import experiment_from_snakemake

prompts.run(experiment_from_snakemake(snakemake), snakemake.output[0])
