from pipeline import generate
from pipeline.config import cell_for, experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
w = snakemake.wildcards
cell = cell_for(exp, w.model, w.source, w.intervention)
if cell.source == "sweep":
    plan = generate.plan_sweep_cell(w.model, snakemake.input.picks, snakemake.input.candidates, cell.intervention,
                                    exp.ablation_layers)
else:
    plan = generate.plan_grid_cell(snakemake.input.direction[0] if snakemake.input.direction else None,
                                   source=cell.source, intervention=cell.intervention, coefficient=cell.coefficient,
                                   normalize=exp.normalize, addition_layer=exp.addition_layer,
                                   ablation_layers=exp.ablation_layers)
generate.run(exp.models[w.model], snakemake.input.model, snakemake.input.prompts, plan, snakemake.output.generations,
             max_new_tokens=int(exp.generation["max_new_tokens"]), batch_size=int(exp.generation["batch_size"]),
             device=exp.device, threads=snakemake.threads, exp_file=exp.file,
             capability_out=snakemake.output.capability, capability_cfg=exp.capability,
             baseline_path=snakemake.input.baseline[0] if snakemake.input.baseline else None,
             nll_prompts=int(exp.coherence["nll_prompts"]))
