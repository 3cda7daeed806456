from pathlib import Path

from pipeline import aggregate
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
charts = {model: str(Path(exp.out) / "charts" / f"{model}.png") for model in exp.models}
selections = {model: (sel, png) for model, sel, png in
              zip(exp.models, snakemake.input.selections, snakemake.input.heatmaps)}
swept = list(exp.sweep.models) if exp.sweep else []
sweeps = {model: files for model, files in
          zip(swept, zip(snakemake.input.sweeps, snakemake.input.sweep_picks, snakemake.input.sweep_heatmaps))}
aggregate.run(exp.name, list(snakemake.input.scores), str(exp.out), charts, selections,
              list(snakemake.input.capability), sweeps=sweeps,
              scatter_path=snakemake.output.sweep_scatter[0] if snakemake.output.sweep_scatter else None,
              coherence=exp.coherence)
