from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import export, generate
from pipeline.config import Generation
from pipeline.errors import ConfigError
from pipeline.specs import Cell, ModelSpec, from_params

with job(snakemake) as p:
    inp, w = snakemake.input, snakemake.wildcards
    where = f"{w.model}/self/{w.cell}"
    if p.cell is None:
        raise ConfigError(p.file, "interventions", f"no grid cell {where} in this experiment: export one of its cells")
    cell = from_params(Cell, p.cell)
    export.check_exportable(cell.kind, where, p.file)  # one line, before the direction or the model is read
    plan = generate.plan_cell(cell, p.intervention, selected_path=inp.direction)
    gen = from_params(Generation, p.generation)
    first = lambda files: files[0] if files else None  # noqa: E731
    export.run(from_params(ModelSpec, p.model), inp.model, plan, snakemake.output[0],
               info=export.Run(experiment=p.experiment, exp_file=p.file, max_new_tokens=gen.max_new_tokens,
                               stop_at_eos=gen.stop_at_eos, intervention=p.intervention),
               evidence=export.Evidence(generations=inp.generations, scores=first(inp.scores),
                                        baseline_scores=first(inp.baseline_scores), capability=first(inp.capability),
                                        selected=inp.direction, candidates=first(inp.candidates)),
               device=p.device, threads=snakemake.threads, max_shard_size=p.max_shard_size)
