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
        # report(...): what `snakemake --report report.html` shows (captions in workflow/report/)
        summary=OUT + "/summary.parquet",
        csv=report(OUT + "/summary.csv", caption="../report/summary.rst", category="Summary"),
        md=OUT + "/summary.md",
        report=OUT + "/report.md",
        charts=[report(OUT + f"/charts/{m}.png", caption="../report/refusal_chart.rst", category="Refusal rates",
                       labels={"model": m, "figure": "refusal rate by condition"}) for m in EXP.models],
        methods=OUT + "/methods.parquet",
        methods_csv=report(OUT + "/methods.csv", caption="../report/methods.rst", category="Methods side by side",
                           labels={"model": "all", "figure": "methods table"}),
        methods_charts=[report(OUT + f"/charts/methods_{m}.png", caption="../report/methods_chart.rst",
                               category="Methods side by side", labels={"model": m, "figure": "refusal vs KL"})
                        for m in EXP.models],
        sweep_scatter=[report(OUT + "/charts/sweep_prediction.png", caption="../report/sweep_prediction.rst",
                              category="Sweep")] if EXP.sweep else [],
        similarity=[report(OUT + "/charts/direction_similarity.png", caption="../report/direction_similarity.rst",
                           category="Base vs chat")] if EXP.pairs else [],
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
