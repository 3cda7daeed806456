from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import stability
from pipeline.config import Bootstrap, Selection
from pipeline.specs import ModelSpec, from_params

with job(snakemake) as p:
    inp, out = snakemake.input, snakemake.output
    names = list(p.forced)  # every model of the experiment, in the order of the inputs
    folders = dict(zip(p.models, inp.models))  # the reselected models' prepared folders
    models = {name: (from_params(ModelSpec, p.models[name]) if name in p.models else None, folders.get(name),
                     bool(p.forced[name])) for name in names}
    stability.run(models, dict(zip(names, inp.activations)), dict(zip(names, inp.selected)),
                  from_params(Bootstrap, p.bootstrap), out.table, out.chart, out.md, method=p.method,
                  settings=p.method_settings, filter_prompts=p.filter,
                  rules=from_params(Selection, p.selection) if p.selection else None,
                  prompts_path=inp.prompts[0] if inp.prompts else None, device=p.device,
                  threads=snakemake.threads, exp_file=p.file, rule=p.select or "auto")
