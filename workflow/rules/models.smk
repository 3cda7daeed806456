rule prepare_model:
    """Assemble/verify/dequantize (GGUF), build (random_init) or point to (hub, path) a model, once."""
    output:
        directory(MODELS + "/{model}"),
    params:
        model=lambda w: EXP.model_spec(w.model).as_params(),
    threads: 1  # dequantizing is mostly single-threaded: let two models prepare at once
    resources:
        gpu=0,
        mem_mb=8000,
    script:
        "../scripts/prepare_model.py"
