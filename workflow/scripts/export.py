from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import export, generate
from pipeline.config import Generation
from pipeline.errors import ConfigError
from pipeline.specs import FRONT_PREFIX, Cell, ModelSpec, Source, from_params

with job(snakemake) as p:
    inp, w = snakemake.input, snakemake.wildcards
    # the rule's lookup: front<i> is the optimize study's trial, any other name a cell of the model's own direction
    where = f"{w.model}/{Source.OPTIMIZE if w.cell.startswith(FRONT_PREFIX) else Source.SELF}/{w.cell}"
    if p.cell is None:
        raise ConfigError(p.file, "interventions", f"no grid cell {where} in this experiment: export one of its cells")
    cell = from_params(Cell, p.cell)
    # one line, before the direction or the model is read
    export.check_exportable(cell.kind, where, p.file, export.config_key(cell.source))
    first = lambda files: files[0] if files else None  # noqa: E731
    plan = generate.plan_cell(cell, p.intervention, selected_path=inp.direction, trials_path=first(inp.trials),
                              pareto_path=first(inp.pareto))
    # a front cell's card names its trial: the one plan_cell took the settings of
    trial = generate.front_trial(cell.model, cell.pick, inp.trials[0], inp.pareto[0]) if inp.trials else None
    gen = from_params(Generation, p.generation)
    export.run(from_params(ModelSpec, p.model), inp.model, plan, snakemake.output[0],
               info=export.Run(experiment=p.experiment, exp_file=p.file, max_new_tokens=gen.max_new_tokens,
                               stop_at_eos=gen.stop_at_eos, intervention=p.intervention, trial=trial),
               evidence=export.Evidence(generations=inp.generations, scores=first(inp.scores),
                                        baseline_scores=first(inp.baseline_scores), capability=first(inp.capability),
                                        selected=inp.direction, candidates=first(inp.candidates),
                                        trials=first(inp.trials)),
               device=p.device, threads=snakemake.threads, max_shard_size=p.max_shard_size)
