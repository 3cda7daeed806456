from pipeline.job import job  # first: telemetry off before the hub libraries load
from pathlib import Path

from pipeline import aggregate

with job(snakemake) as p:
    inp, out = snakemake.input, snakemake.output
    sweeps = dict(zip(p.swept, zip(inp.sweeps, inp.sweep_picks, inp.sweep_heatmaps)))
    aggregate.run(p.name, list(inp.scores), str(Path(out.summary).parent), dict(zip(p.models, out.charts)),
                  dict(zip(p.models, zip(inp.selections, inp.heatmaps))), list(inp.capability), sweeps=sweeps,
                  scatter_path=out.sweep_scatter[0] if out.sweep_scatter else None, coherence=p.coherence,
                  pairs=[tuple(pair) for pair in p.pairs], candidates=dict(zip(p.paired, inp.candidates)),
                  similarity_path=out.similarity[0] if out.similarity else None,
                  activations=dict(zip(p.paired, inp.activations)) if p.bootstrap else None,
                  scorers=list(p.scorers), methods_charts=dict(zip(p.models, out.methods_charts)))
