from pipeline.job import job
from pipeline.models import prepare, set_threads
from pipeline.specs import ModelSpec, from_params

with job(snakemake) as p:
    set_threads(snakemake.threads)
    prepare(from_params(ModelSpec, p.model), snakemake.output[0])
