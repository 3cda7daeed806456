rule aggregate:
    """Summary Parquet, CSV and Markdown tables, bar charts and a report."""
    input:
        grid_files("scores"),
    output:
        summary=OUT + "/summary.parquet",
        csv=OUT + "/summary.csv",
        md=OUT + "/summary.md",
        report=OUT + "/report.md",
        charts=expand(OUT + "/charts/{model}.png", model=list(EXP.models)),
    script:
        "../scripts/aggregate.py"
