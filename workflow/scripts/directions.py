from pipeline import directions
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
model = snakemake.wildcards.model
layer, position = exp.direction_choice(model)
directions.run(model, snakemake.input[0], snakemake.output.candidates, snakemake.output.selected,
               layer=layer, position=position, random_seed=exp.random_seed,
               model_file=exp.models[model].file, exp_file=exp.file)
