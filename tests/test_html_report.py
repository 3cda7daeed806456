"""`snakemake --report` on a finished run: Snakemake's self-contained HTML report carries the aggregate outputs
marked with `report(...)` in workflow/rules/aggregate.smk (the summary and methods tables, the charts)."""

import base64

import polars as pl
import pytest

from conftest import snakemake


@pytest.mark.slow
def test_html_report_embeds_the_tables_and_charts(tiny_dag, tmp_path):
    work, out, config = tiny_dag["work"], tiny_dag["out"], tiny_dag["config"]
    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    html_path = tmp_path / "report.html"
    run = snakemake(work, "--report", str(html_path), *config, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    html = html_path.read_text()
    # every marked file is embedded whole, as a base64 data URI
    for name in ("methods.csv", "summary.csv", "charts/methods_tiny-chat.png", "charts/methods_tiny-base.png",
                 "charts/tiny-chat.png"):
        assert base64.b64encode((out / name).read_bytes()).decode() in html, name
    # with its caption and category
    assert "Methods side by side" in html and "Pareto-optimal" in html
    methods = pl.read_csv(out / "methods.csv")
    assert {"harmful_refusals", "kl_tokens", "p_vs_ablation", "pareto"} <= set(methods.columns)
    assert methods["kl_tokens"].is_not_null().all()
