rule aggregate:
    """Summary Parquet, CSV and Markdown tables (rates with Wilson intervals, McNemar p vs baseline), bar charts,
    the methods side by side (table and Pareto chart per model), selection heatmaps and a report."""
    input:
        scores=grid_files("scores"),
        capability=grid_files("capability"),
        selections=expand(OUT + "/directions/{model}/selection.parquet", model=list(EXP.models)),
        heatmaps=expand(OUT + "/directions/{model}/selection.png", model=list(EXP.models)),
        sweeps=sweep_outputs("sweep.parquet"),
        sweep_picks=sweep_outputs("picks.parquet"),
        sweep_heatmaps=sweep_outputs("sweep.png"),
        candidates=expand(OUT + "/directions/{model}/candidates.parquet", model=PAIRED),
        # the base/chat cosine's bootstrap resamples the train prompts; over filtered prompts it would not
        # reproduce the directions, so then it is not run
        activations=[] if EXP.direction.filter else expand(OUT + "/activations/{model}.parquet", model=PAIRED),
    output:
        summary=OUT + "/summary.parquet",
        csv=OUT + "/summary.csv",
        md=OUT + "/summary.md",
        report=OUT + "/report.md",
        charts=expand(OUT + "/charts/{model}.png", model=list(EXP.models)),
        methods=OUT + "/methods.parquet",
        methods_csv=OUT + "/methods.csv",
        methods_charts=expand(OUT + "/charts/methods_{model}.png", model=list(EXP.models)),
        sweep_scatter=[OUT + "/charts/sweep_prediction.png"] if EXP.sweep else [],
        similarity=[OUT + "/charts/direction_similarity.png"] if EXP.pairs else [],
    params:
        name=EXP.name,
        models=list(EXP.models),
        swept=list(EXP.sweep.models) if EXP.sweep else [],
        coherence=to_params(EXP.coherence),
        pairs=EXP.pairs,
        paired=PAIRED,
        bootstrap=not EXP.direction.filter,
        # the candidates' direction method (a plugin's too) remakes the directions in the base/chat bootstrap
        # the experiment's own methods: its kinds' labels and order, its direction method's bootstrap
        plugins=list(dict.fromkeys(plugins_for(INTERVENTIONS, [c.kind for c in EXP.cells() if c.kind])
                                   + plugins_for(DIRECTION_METHODS, [EXP.direction.method]))),
        scorers=[s.name for s in EXP.scorers],
    log:
        LOGS + "/aggregate.log",
    script:
        "../scripts/aggregate.py"
