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
        model=lambda w: EXP.models[w.model].as_params(),
        sweep=EXP.sweep.as_params() if EXP.sweep else None,
        interventions=EXP.intervention_params(),
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/sweep.py"
