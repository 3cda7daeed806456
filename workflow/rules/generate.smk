rule generate:
    """One grid cell: greedy generations on the test prompts, steered or ablated via nnsight."""
    input:
        model=MODELS + "/{model}",
        prompts=OUT + "/prompts.parquet",
        direction=direction_file,
        baseline=baseline_file,
        picks=sweep_picks_file,
        candidates=sweep_candidates_file,
    output:
        generations=OUT + "/generations/{model}/{source}/{cell}.parquet",
        capability=OUT + "/capability/{model}/{source}/{cell}.parquet",
    params:
        model=model_params,
        cell=lambda w: to_params(EXP.cell(w.model, w.source, w.cell)),
        intervention=cell_intervention,
        generation=to_params(EXP.generation),
        capability=to_params(EXP.capability),
        nll_prompts=EXP.coherence.nll_prompts,
        device=EXP.device,
        file=EXP.file,
    log:
        LOGS + "/generate/{model}/{source}/{cell}.log",
    benchmark:
        LOGS + "/generate/{model}/{source}/{cell}.benchmark.tsv"
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/generate.py"
