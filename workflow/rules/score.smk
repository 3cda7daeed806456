rule score:
    """Mark each completion refused or not with the experiment's scorer."""
    input:
        OUT + "/generations/{model}/{source}/{intervention}.parquet",
    output:
        OUT + "/scores/{model}/{source}/{intervention}.parquet",
    params:
        scorer=EXP.scorer.as_params(),
    script:
        "../scripts/score.py"
