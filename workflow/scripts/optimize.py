from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import optimize
from pipeline.config import OptimizeSpec
from pipeline.specs import ModelSpec, from_params

with job(snakemake) as p:
    inp, out = snakemake.input, snakemake.output
    optimize.run(from_params(ModelSpec, p.model), inp.model, inp.prompts, inp.selected,
                 from_params(OptimizeSpec, p.optimize),
                 optimize.Outputs(trials=out.trials, pareto=out.pareto, front=out.front),
                 device=p.device, threads=snakemake.threads, exp_file=p.file,
                 activations_path=inp.get("activations"))
