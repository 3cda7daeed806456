from pipeline import score
from pipeline.config import experiment_from_snakemake

exp = experiment_from_snakemake(snakemake)
judge = list(getattr(snakemake.input, "judge", []))
score.run(exp.scorer, snakemake.input[0], snakemake.output[0], judge_dir=judge[0] if judge else None,
          device=exp.device, threads=snakemake.threads)
