# Helpers shared by the rules: the grid and the files each cell needs.


def cell_path(kind, cell):
    return f"{OUT}/{kind}/{cell.model}/{cell.source}/{cell.intervention_id}.parquet"


def grid_files(kind):
    return [cell_path(kind, c) for c in EXP.cells()]


def direction_file(wildcards):
    """Where a cell's direction comes from: its own model, or the paired model."""
    if wildcards.source in ("none", "sweep"):
        return []
    owner = wildcards.model if wildcards.source in ("self", "random") else wildcards.source
    return [f"{OUT}/directions/{owner}/selected.parquet"]


def baseline_file(wildcards):
    """Steered cells measure loss on the model's own baseline completions, so they need them first."""
    if wildcards.intervention == "baseline" or wildcards.source == "sweep" or not EXP.capability["enabled"]:
        return []
    return [f"{OUT}/generations/{wildcards.model}/none/baseline.parquet"]


def sweep_picks_file(wildcards):
    """Sweep cells learn their layers and coefficient from the sweep's picks."""
    return [f"{OUT}/sweep/{wildcards.model}/picks.parquet"] if wildcards.source == "sweep" else []


def sweep_candidates_file(wildcards):
    return [f"{OUT}/directions/{wildcards.model}/candidates.parquet"] if wildcards.source == "sweep" else []


def sweep_outputs(kind):
    models = list(EXP.sweep.models) if EXP.sweep else []
    return [f"{OUT}/sweep/{m}/{kind}" for m in models]
