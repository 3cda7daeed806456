from pipeline import activations
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
activations.run(exp.models[snakemake.wildcards.model], snakemake.input.model, snakemake.input.prompts,
                snakemake.output[0], batch_size=exp.activations["batch_size"], dtype=exp.activations["dtype"],
                device=exp.device, threads=snakemake.threads)
