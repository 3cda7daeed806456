rule prompts:
    """Load the harmful and harmless sets through `datasets` and split them (seeded)."""
    output:
        OUT + "/prompts.parquet",
    params:
        datasets={label: {split: [to_params(spec) for spec in pool] for split, pool in splits.items()}
                  for label, splits in EXP.dataset_splits.items()},
        split=to_params(EXP.split),
        file=EXP.file,
    log:
        LOGS + "/prompts.log",
    script:
        "../scripts/prompts.py"
