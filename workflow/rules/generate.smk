# Generate: grid cells of one model per job (`generation.cells_per_job`), so the model loads once
# for all of them; each cell still writes its own Parquet, which Snakemake tracks. One rule per
# job, as a job's outputs are its cells: generate_<model>_grid1, generate_<model>_sweep1, ...


# Generation settings that cannot change a completion: not params, so changing them reruns nothing
# (cells_per_job is read while the DAG is built, to group cells into jobs, and by no job).
SPEED_KNOBS = ("cells_per_pass", "cells_per_job")


def generate_job_inputs(job):
    sweep = job.cells[0].source == "sweep"
    needs_baseline = EXP.capability.enabled and not sweep and all(c.name != "baseline" for c in job.cells)
    return {
        "model": f"{MODELS}/{job.model}",
        "prompts": f"{OUT}/prompts.parquet",
        "directions": sorted({f for f in map(cell_direction_file, job.cells) if f}),
        # steered cells measure loss on the model's own baseline completions
        "baseline": [cell_path("generations", Cell(job.model, "none", "baseline"))] if needs_baseline else [],
        "picks": [f"{OUT}/sweep/{job.model}/picks.parquet"] if sweep else [],
        # sweep picks and selection rules' picks (source rule) are candidates, not the selected direction
        "candidates": [f"{OUT}/directions/{job.model}/candidates.parquet"]
        if sweep or any(c.source == "rule" for c in job.cells) else [],
        # the optimize study's trials, for its generated ones (front1, ...)
        "trials": [f"{OUT}/optimize/{job.model}/trials.parquet"] if job.cells[0].source == "optimize" else [],
        "pareto": [f"{OUT}/optimize/{job.model}/pareto.parquet"] if job.cells[0].source == "optimize" else [],
        # kinds that set the stream to the edited model's own harmless level (affine) read its activations
        "activations": [f"{OUT}/activations/{job.model}.parquet"]
        if any(c.kind and INTERVENTIONS.get(c.kind).reads_activations for c in job.cells) else [],
    }


for gen_job in EXP.generate_jobs():

    rule:
        name: f"generate_{gen_job.model}_{gen_job.name}"
        input:
            **generate_job_inputs(gen_job),
        output:
            generations=[cell_path("generations", c) for c in gen_job.cells],
            capability=[cell_path("capability", c) for c in gen_job.cells],
        params:
            model=to_params(EXP.models[gen_job.model]),
            cells=[{"cell": to_params(c), "intervention": cell_intervention(c), "direction": cell_direction_file(c)}
                   for c in gen_job.cells],
            # what changes the completions; the speed knobs (cells_per_pass: outputs identical by design,
            # tests/test_generate_jobs.py) ride in resources, which are no rerun trigger
            generation={k: v for k, v in to_params(EXP.generation).items() if k not in SPEED_KNOBS},
            capability=to_params(EXP.capability),
            nll_prompts=EXP.coherence.nll_prompts,
            device=EXP.device,
            file=EXP.file,
            plugins=plugins_for(INTERVENTIONS, [c.kind for c in gen_job.cells if c.kind]),
        log:
            f"{LOGS}/generate/{gen_job.model}/{gen_job.name}.log",
        benchmark:
            f"{LOGS}/generate/{gen_job.model}/{gen_job.name}.benchmark.tsv"
        threads: EXP.threads
        resources:
            gpu=GPU,
            cells_per_pass=EXP.generation.cells_per_pass,
        script:
            "../scripts/generate.py"
