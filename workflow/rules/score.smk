def judge_model(wildcards):
    """A judge scorer's model, prepared by the same rule as every other model."""
    return [f"{MODELS}/{EXP.scorer.judge.name}"] if EXP.scorer.judge else []


rule score:
    """Mark each completion refused or not with the experiment's scorer."""
    input:
        generations=OUT + "/generations/{model}/{source}/{cell}.parquet",
        judge=judge_model,
    output:
        OUT + "/scores/{model}/{source}/{cell}.parquet",
    params:
        scorer=to_params(EXP.scorer),
        device=EXP.device,
    log:
        LOGS + "/score/{model}/{source}/{cell}.log",
    benchmark:
        LOGS + "/score/{model}/{source}/{cell}.benchmark.tsv"  # a model rule when the scorer is a judge
    threads: EXP.threads if EXP.scorer.judge else 1
    resources:
        gpu=GPU if EXP.scorer.judge else 0,
    script:
        "../scripts/score.py"
