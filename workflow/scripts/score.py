from pipeline import score
from pipeline.config import experiment_from_snakemake

score.run(experiment_from_snakemake(snakemake).scorer, snakemake.input[0], snakemake.output[0])
