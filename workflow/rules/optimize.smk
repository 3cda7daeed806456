# Optimize: an Optuna study per model over the continuous settings of the intervention kind the experiment's
# `optimize:` block names (pipeline/optimize.py); not part of `all`. The target comes before --config:
#   snakemake --cores 2 optimize --config overrides="experiment=tiny +experiment.optimize=..."
# The study's journal, results/<experiment>/optimize/<model>/study.journal, is deliberately not an output:
# Snakemake would delete it with a killed or failed job, and it is what a rerun resumes from.


def optimize_targets():
    if EXP.optimize is None:
        return []
    return expand(OUT + "/optimize/{model}/{name}", model=list(EXP.optimize.settings.models),
                  name=["trials.parquet", "pareto.parquet", "front.png"])


def optimize_inputs(wildcards):
    inputs = {
        "model": f"{MODELS}/{wildcards.model}",
        "prompts": f"{OUT}/prompts.parquet",
        "selected": f"{OUT}/directions/{wildcards.model}/selected.parquet",
    }
    if EXP.optimize is not None and INTERVENTIONS.get(EXP.optimize.settings.method).reads_activations:
        inputs["activations"] = f"{OUT}/activations/{wildcards.model}.parquet"  # affine's harmless means
    return inputs


def study_params():
    """The study's settings less `generate` (which trials become grid cells, read by the generate jobs): changing
    it reruns no study."""
    if EXP.optimize is None:
        return None
    params = to_params(EXP.optimize)
    params["settings"].pop("generate")
    return params


rule optimize:
    """Every optimize model's study: its trials, Pareto front and chart (none without an `optimize:` block)."""
    input:
        optimize_targets(),


rule optimize_model:
    """Run trials until the model's study holds optimize.trials complete ones; write its tables and chart."""
    input:
        unpack(optimize_inputs),
    output:
        trials=OUT + "/optimize/{model}/trials.parquet",
        pareto=OUT + "/optimize/{model}/pareto.parquet",
        front=OUT + "/optimize/{model}/front.png",
    params:
        model=model_params,
        optimize=study_params(),
        device=EXP.device,
        file=EXP.file,
        plugins=plugins_for(INTERVENTIONS, [EXP.optimize.settings.method]) if EXP.optimize is not None else [],
    log:
        LOGS + "/optimize/{model}.log",
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/optimize.py"
