from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import activations
from pipeline.config import Activations
from pipeline.specs import ModelSpec, from_params

with job(snakemake) as p:
    settings = from_params(Activations, p.settings)
    activations.run(from_params(ModelSpec, p.model), snakemake.input.model, snakemake.input.prompts,
                    snakemake.output[0], batch_size=settings.batch_size, dtype=settings.dtype, device=p.device,
                    threads=snakemake.threads)
