from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import length
from pipeline.specs import LengthSpec, ModelSpec, from_params

with job(snakemake) as p:
    inp, out = snakemake.input, snakemake.output
    # input.models lists the prepared folders in the order of params.models (both follow EXP.models)
    models = {name: (from_params(ModelSpec, spec), folder) for (name, spec), folder in zip(p.models.items(), inp.models)}
    length.run(list(inp.generations), models, from_params(LengthSpec, p.length), out.table, out.chart, out.md,
               max_new_tokens=p.max_new_tokens)
