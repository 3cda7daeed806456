from pipeline import select
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
model = snakemake.wildcards.model
layer, position, forced = exp.direction_choice(model)
select.run(exp.models[model], snakemake.input.model, snakemake.input.prompts, snakemake.input.candidates,
           snakemake.output.selection, snakemake.output.selected, snakemake.output.heatmap,
           forced=(layer, position) if forced else None, settings=exp.selection_settings(),
           random_seed=exp.random_seed, device=exp.device, threads=snakemake.threads, exp_file=exp.file)
