def judge_model(wildcards):
    """A judge scorer's model, prepared by the same rule as every other model."""
    return [f"{MODELS}/{EXP.scorer.judge.name}"] if EXP.scorer.judge else []


rule score:
    """Mark each completion refused or not with the experiment's scorer."""
    input:
        generations=OUT + "/generations/{model}/{source}/{intervention}.parquet",
        judge=judge_model,
    output:
        OUT + "/scores/{model}/{source}/{intervention}.parquet",
    params:
        scorer=EXP.scorer.as_params(),
    threads: EXP.threads if EXP.scorer.judge else 1
    resources:
        gpu=GPU if EXP.scorer.judge else 0,
    script:
        "../scripts/score.py"
