def judge_models(wildcards):
    """The judge scorers' models, prepared by the same rule as every other model."""
    return [f"{MODELS}/{name}" for name in EXP.judges]


rule score:
    """Mark each completion refused or not with each of the experiment's scorers (one row per scorer)."""
    input:
        generations=OUT + "/generations/{model}/{source}/{cell}.parquet",
        judge=judge_models,
    output:
        OUT + "/scores/{model}/{source}/{cell}.parquet",
    params:
        scorers=[to_params(s) for s in EXP.scorers],
        judges=list(EXP.judges),
        device=EXP.device,
    log:
        LOGS + "/score/{model}/{source}/{cell}.log",
    benchmark:
        LOGS + "/score/{model}/{source}/{cell}.benchmark.tsv"  # a model rule when a scorer is a judge
    threads: EXP.threads if EXP.judges else 1
    resources:
        gpu=GPU if EXP.judges else 0,
    script:
        "../scripts/score.py"
