from pathlib import Path

from pipeline import aggregate
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
charts = {model: str(Path(exp.out) / "charts" / f"{model}.png") for model in exp.models}
aggregate.run(exp.name, list(snakemake.input), str(exp.out), charts)
