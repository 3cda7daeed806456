rule prompts:
    """Load the harmful and harmless sets through `datasets` and split them (seeded)."""
    output:
        OUT + "/prompts.parquet",
    params:
        datasets=lambda w: {label: {split: spec.as_params() for split, spec in splits.items()}
                            for label, splits in EXP.dataset_splits.items()},
        split=EXP.split,
    script:
        "../scripts/prompts.py"
