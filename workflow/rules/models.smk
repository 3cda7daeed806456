rule prepare_model:
    """Assemble/verify/dequantize (GGUF), build (random_init), download a pinned snapshot (hub) or point to (path) a model, once."""
    output:
        directory(MODELS + "/{model}"),
    params:
        model=lambda w: to_params(EXP.model_spec(w.model).for_preparation()),
    log:
        MODELS + "/logs/{model}.log",
    benchmark:
        MODELS + "/logs/{model}.benchmark.tsv"
    threads: 1  # dequantizing is mostly single-threaded: let two models prepare at once
    resources:
        gpu=0,
        mem_mb=8000,
    script:
        "../scripts/prepare_model.py"
