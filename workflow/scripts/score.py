from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import score
from pipeline.specs import ScorerSpec, from_params

with job(snakemake) as p:
    dirs = snakemake.input.judge
    dirs = [dirs] if isinstance(dirs, str) else list(dirs)  # the judges' prepared folders, in p.judges' order
    score.run([from_params(ScorerSpec, s) for s in p.scorers], snakemake.input.generations, snakemake.output[0],
              judge_dirs=dict(zip(p.judges, dirs)), device=p.device, threads=snakemake.threads)
