rule directions:
    """Mean-difference candidates per layer x position; the configured one and a random control."""
    input:
        OUT + "/activations/{model}.parquet",
    output:
        candidates=OUT + "/directions/{model}/candidates.parquet",
        selected=OUT + "/directions/{model}/selected.parquet",
    params:
        choice=lambda w: EXP.direction_choice(w.model),
        random_seed=EXP.random_seed,
    script:
        "../scripts/directions.py"
