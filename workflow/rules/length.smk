# Refusal rate vs generation length: every grid cell's completions, generated once at the longest
# length, scored on their first k tokens for each k (pipeline/length.py). Only for experiments
# with a `length:` block.

LENGTH_TARGETS = [f"{OUT}/length/length.parquet", f"{OUT}/length/length.png", f"{OUT}/length.md"] \
    if EXP.length is not None else []

if EXP.length is not None:

    rule length:
        """Rescore each completion on its first k tokens, for each k: table, chart, report fragment."""
        input:
            generations=grid_files("generations"),
            models=expand(MODELS + "/{model}", model=list(EXP.models)),  # their tokenizers
        output:
            table=OUT + "/length/length.parquet",
            chart=OUT + "/length/length.png",
            md=OUT + "/length.md",
        params:
            length=to_params(EXP.length),
            models={m: to_params(spec) for m, spec in EXP.models.items()},
            max_new_tokens=EXP.generation.max_new_tokens,
        log:
            LOGS + "/length.log",
        benchmark:
            LOGS + "/length.benchmark.tsv"
        threads: 1
        resources:
            gpu=0,
        script:
            "../scripts/length.py"
