rule prompts:
    """Load the harmful and harmless sets through `datasets` and split them (seeded)."""
    output:
        OUT + "/prompts.parquet",
    params:
        datasets=lambda w: {k: v.as_params() for k, v in EXP.datasets.items()},
        split=EXP.split,
    script:
        "../scripts/prompts.py"
