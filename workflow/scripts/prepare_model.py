from pipeline.config import experiment_from_snakemake
from pipeline.models import prepare, set_threads

exp = experiment_from_snakemake(snakemake)
set_threads(snakemake.threads)
prepare(exp.model_spec(snakemake.wildcards.model), snakemake.output[0])
