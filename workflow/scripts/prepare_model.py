from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline.models import prepare, set_threads
from pipeline.specs import ModelSpec, from_params

with job(snakemake, online="hub" in snakemake.params.model["source"]) as p:
    set_threads(snakemake.threads)
    prepare(from_params(ModelSpec, p.model), snakemake.output[0])
