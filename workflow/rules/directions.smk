rule directions:
    """Candidates by direction.method (default: difference of means) for every layer x post-instruction position
    (train prompts)."""
    input:
        OUT + "/activations/{model}.parquet",
    output:
        OUT + "/directions/{model}/candidates.parquet",
    params:
        method=EXP.direction.method,
        method_settings=EXP.direction.method_settings,  # validated, defaults filled in: a change reruns the job
        plugins=plugins_for(DIRECTION_METHODS, [EXP.direction.method]),  # a plugin's method, registered in the job
        filter=EXP.direction.filter,
        file=EXP.file,
    log:
        LOGS + "/directions/{model}.log",
    script:
        "../scripts/directions.py"


rule other_directions:
    """direction.other_methods: each other method's direction at the selected layer and position, from the same
    train prompts (grid sources self-<method>)."""
    input:
        activations=OUT + "/activations/{model}.parquet",
        selected=OUT + "/directions/{model}/selected.parquet",
    output:
        OUT + "/directions/{model}/other_methods.parquet",
    params:
        methods=EXP.direction.other_methods,  # validated, defaults filled in: a change reruns the job
        plugins=plugins_for(DIRECTION_METHODS, list(EXP.direction.other_methods)),
        filter=EXP.direction.filter,
        file=EXP.file,
    log:
        LOGS + "/directions/{model}.other_methods.log",
    script:
        "../scripts/other_directions.py"


rule select:
    """Score every candidate on the val prompts (bypass, induce, KL, COSMIC's cosines) and choose one by
    direction.select's rule, or take the forced one."""
    input:
        model=MODELS + "/{model}",
        prompts=OUT + "/prompts.parquet",
        candidates=OUT + "/directions/{model}/candidates.parquet",
    output:
        selection=OUT + "/directions/{model}/selection.parquet",
        selected=OUT + "/directions/{model}/selected.parquet",
        heatmap=OUT + "/directions/{model}/selection.png",
    params:
        model=model_params,
        choice=lambda w: EXP.direction_choice(w.model),
        selection=to_params(EXP.direction.selection),
        select=EXP.direction.select,
        filter=EXP.direction.filter,
        random_seed=EXP.direction.random_seed,
        device=EXP.device,
        file=EXP.file,
    log:
        LOGS + "/select/{model}.log",
    benchmark:
        LOGS + "/select/{model}.benchmark.tsv"
    threads: EXP.threads
    resources:
        gpu=lambda w: 0 if EXP.direction_choice(w.model)[2] else GPU,
    script:
        "../scripts/select.py"
