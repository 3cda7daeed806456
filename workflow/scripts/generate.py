from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import generate
from pipeline.config import Capability, Generation
from pipeline.specs import Cell, ModelSpec, from_params

with job(snakemake) as p:
    inp, out = snakemake.input, snakemake.output
    picks = inp.picks[0] if inp.picks else None
    candidates = inp.candidates[0] if inp.candidates else None
    activations = inp.activations[0] if inp.activations else None
    plans = [generate.plan_cell(from_params(Cell, c["cell"]), c["intervention"], selected_path=c["direction"],
                                picks_path=picks, candidates_path=candidates, activations_path=activations,
                                trials_path=inp.trials[0] if inp.trials else None,
                                pareto_path=inp.pareto[0] if inp.pareto else None)
             for c in p.cells]
    gen = from_params(Generation, p.generation)
    generate.run_cells(from_params(ModelSpec, p.model), inp.model, inp.prompts,
                       list(zip(plans, out.generations, out.capability)),
                       max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, device=p.device,
                       threads=snakemake.threads, exp_file=p.file, capability_cfg=from_params(Capability, p.capability),
                       baseline_path=inp.baseline[0] if inp.baseline else None, nll_prompts=p.nll_prompts,
                       cells_per_pass=snakemake.resources.cells_per_pass, stop_at_eos=gen.stop_at_eos)
