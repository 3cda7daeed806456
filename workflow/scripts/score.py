from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import score
from pipeline.specs import ScorerSpec, from_params

with job(snakemake) as p:
    dirs = snakemake.input.judge
    dirs = [dirs] if isinstance(dirs, str) else list(dirs)  # the judges' prepared folders, in p.judges' order
    score.run_cells([from_params(ScorerSpec, s) for s in p.scorers],
                    list(zip(snakemake.input.generations, snakemake.output)),
                    judge_dirs=dict(zip(p.judges, dirs)), device=p.device, threads=snakemake.threads)
