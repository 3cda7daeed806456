from pipeline import sweep
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
model = snakemake.wildcards.model
sweep.run(exp.models[model], snakemake.input.model, snakemake.input.prompts, snakemake.input.candidates,
          snakemake.input.selected, snakemake.output.sweep, snakemake.output.picks, snakemake.output.heatmap,
          sweep=exp.sweep, normalize=exp.normalize, ablation_layers=exp.ablation_layers, device=exp.device,
          threads=snakemake.threads, exp_file=exp.file,
          # selection scored bypass on the same val prompts with the same ablation: reuse it
          selection_path=snakemake.input.selection if not exp.selection_settings()["filter"]
          and exp.ablation_layers is None else None)
