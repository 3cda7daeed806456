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
        generations=OUT + "/generations/{model}/{source}/{intervention}.parquet",
        capability=OUT + "/capability/{model}/{source}/{intervention}.parquet",
    params:
        model=lambda w: EXP.models[w.model].as_params(),
        cell=lambda w: {"source": w.source, "intervention": w.intervention, **EXP.intervention_params()},
        generation=EXP.generation,
        capability=EXP.capability,
        nll_prompts=EXP.coherence["nll_prompts"],
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/generate.py"
