from pipeline.job import job  # first: telemetry off before the hub libraries load
from pipeline import score
from pipeline.specs import ScorerSpec, from_params

with job(snakemake) as p:
    judge = list(snakemake.input.judge)
    score.run(from_params(ScorerSpec, p.scorer), snakemake.input.generations, snakemake.output[0],
              judge_dir=judge[0] if judge else None, device=p.device, threads=snakemake.threads)
