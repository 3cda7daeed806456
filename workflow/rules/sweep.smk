rule sweep:
    """Logit-score sweep: extraction layer x addition layer x coefficient, and ablation per layer (val prompts)."""
    input:
        model=MODELS + "/{model}",
        prompts=OUT + "/prompts.parquet",
        candidates=OUT + "/directions/{model}/candidates.parquet",
        selected=OUT + "/directions/{model}/selected.parquet",
        selection=OUT + "/directions/{model}/selection.parquet",
    output:
        sweep=OUT + "/sweep/{model}/sweep.parquet",
        picks=OUT + "/sweep/{model}/picks.parquet",
        heatmap=OUT + "/sweep/{model}/sweep.png",
    params:
        model=model_params,
        sweep=to_params(EXP.sweep),
        normalize=EXP.intervention["addition"].normalize,
        ablation_layers=EXP.intervention.cell_params("ablation")["ablation_layers"],
        reuse_selection=EXP.reuse_selection_bypass(),
        device=EXP.device,
        file=EXP.file,
    log:
        LOGS + "/sweep/{model}.log",
    benchmark:
        LOGS + "/sweep/{model}.benchmark.tsv"
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/sweep.py"
