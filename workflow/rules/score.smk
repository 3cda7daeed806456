# Score: the cells of one generate job per score job (score_<model>_<job>), so a judge model loads
# once for all of them and phrase scoring pays one job start-up; each cell still gets its own scores
# Parquet, which Snakemake tracks.


def judge_models():
    """The judge scorers' models, prepared by the same rule as every other model."""
    return [f"{MODELS}/{name}" for name in EXP.judges]


for score_job in EXP.generate_jobs():

    rule:
        name: f"score_{score_job.model}_{score_job.name}"
        input:
            generations=[cell_path("generations", c) for c in score_job.cells],
            judge=judge_models(),
        output:
            [cell_path("scores", c) for c in score_job.cells],
        params:
            scorers=[to_params(s) for s in EXP.scorers],
            judges=list(EXP.judges),
            device=EXP.device,
        log:
            f"{LOGS}/score/{score_job.model}/{score_job.name}.log",
        benchmark:
            f"{LOGS}/score/{score_job.model}/{score_job.name}.benchmark.tsv"  # a model rule when a scorer is a judge
        threads: EXP.threads if EXP.judges else 1
        resources:
            gpu=GPU if EXP.judges else 0,
            # phrase scoring is light; a judge job takes the model rules' defaults (the profile's)
            **({} if EXP.judges else {"mem_mb": 2000, "runtime": 10}),
        script:
            "../scripts/score.py"
