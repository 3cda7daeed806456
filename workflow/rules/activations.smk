rule activations:
    """Residual stream at every block input, post-instruction positions, train prompts."""
    input:
        model=MODELS + "/{model}",
        prompts=OUT + "/prompts.parquet",
    output:
        OUT + "/activations/{model}.parquet",
    params:
        model=model_params,
        settings=to_params(EXP.activations),
        device=EXP.device,
        schema=2,  # bump when the activations Parquet layout changes, so old caches are rebuilt
    log:
        LOGS + "/activations/{model}.log",
    benchmark:
        LOGS + "/activations/{model}.benchmark.tsv"
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/activations.py"
