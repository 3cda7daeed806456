rule activations:
    """Residual stream at every block input, post-instruction positions, train prompts."""
    input:
        model=MODELS + "/{model}",
        prompts=OUT + "/prompts.parquet",
    output:
        OUT + "/activations/{model}.parquet",
    params:
        model=lambda w: EXP.models[w.model].as_params(),
        settings=EXP.activations,
        schema=2,  # bump when the activations Parquet layout changes, so old caches are rebuilt
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/activations.py"
