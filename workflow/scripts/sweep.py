from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import sweep
from pipeline.specs import ModelSpec, SweepSpec, from_params

with job(snakemake) as p:
    out = snakemake.output
    sweep.run(from_params(ModelSpec, p.model), snakemake.input.model, snakemake.input.prompts,
              snakemake.input.candidates, snakemake.input.selected, out.sweep, out.picks, out.heatmap,
              sweep=from_params(SweepSpec, p.sweep), normalize=p.normalize,
              ablation_layers=tuple(p.ablation_layers) if p.ablation_layers else None, device=p.device,
              threads=snakemake.threads, exp_file=p.file,
              selection_path=snakemake.input.selection if p.reuse_selection else None)
