from pathlib import Path

from pipeline import aggregate
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
charts = {model: str(Path(exp.out) / "charts" / f"{model}.png") for model in exp.models}
selections = {model: (sel, png) for model, sel, png in
              zip(exp.models, snakemake.input.selections, snakemake.input.heatmaps)}
aggregate.run(exp.name, list(snakemake.input.scores), str(exp.out), charts, selections,
              list(snakemake.input.capability))
