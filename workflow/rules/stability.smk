# Selection stability: bootstrap draws of the train prompts, each draw's directions compared with the
# full data's (from the cached activations, no forward pass), and with `reselect` the selection rerun
# per draw (pipeline/stability.py). Only for experiments with `direction.bootstrap`.

BOOTSTRAP = EXP.direction.bootstrap
STABILITY_TARGETS = [f"{OUT}/stability/stability.parquet", f"{OUT}/stability/stability.png",
                     f"{OUT}/stability.md"] if BOOTSTRAP is not None else []


def reselected_models():
    """Models whose selection reruns per draw: with `reselect`, those selected automatically."""
    if BOOTSTRAP is None or not BOOTSTRAP.reselect:
        return []
    return [m for m in EXP.models if not EXP.direction_choice(m)[2]]


if BOOTSTRAP is not None:

    rule stability:
        """Bootstrap the train prompts: cosine of each draw's directions with the full data's; picks if reselected."""
        input:
            activations=expand(OUT + "/activations/{model}.parquet", model=list(EXP.models)),
            selected=expand(OUT + "/directions/{model}/selected.parquet", model=list(EXP.models)),
            models=expand(MODELS + "/{model}", model=reselected_models()),
            prompts=[OUT + "/prompts.parquet"] if reselected_models() else [],
        output:
            table=OUT + "/stability/stability.parquet",
            chart=OUT + "/stability/stability.png",
            md=OUT + "/stability.md",
        params:
            bootstrap=to_params(BOOTSTRAP),
            method=EXP.direction.method,  # each draw's directions, made as the directions stage makes them
            method_settings=EXP.direction.method_settings,
            plugins=plugins_for(DIRECTION_METHODS, [EXP.direction.method]),
            filter=EXP.direction.filter,
            # what reselection reads; empty without it, so turning it on reruns only this job
            models={m: to_params(EXP.models[m]) for m in reselected_models()},
            selection=to_params(EXP.direction.selection) if reselected_models() else None,
            select=EXP.direction.select if reselected_models() else None,
            forced={m: EXP.direction_choice(m)[2] for m in EXP.models},
            device=EXP.device,
            file=EXP.file,
        log:
            LOGS + "/stability.log",
        benchmark:
            LOGS + "/stability.benchmark.tsv"
        threads: EXP.threads if reselected_models() else 1
        resources:
            gpu=GPU if reselected_models() else 0,
        script:
            "../scripts/stability.py"
