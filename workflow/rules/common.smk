# Helpers shared by the rules: the grid and the files each cell needs.


def cell_path(kind, cell):
    return f"{OUT}/{kind}/{cell.model}/{cell.source}/{cell.intervention_id}.parquet"


def grid_files(kind):
    return [cell_path(kind, c) for c in EXP.cells()]


def direction_file(wildcards):
    """Where a cell's direction comes from: its own model, or the paired model."""
    if wildcards.source == "none":
        return []
    owner = wildcards.model if wildcards.source in ("self", "random") else wildcards.source
    return [f"{OUT}/directions/{owner}/selected.parquet"]


def baseline_file(wildcards):
    """Steered cells measure loss on the model's own baseline completions, so they need them first."""
    if wildcards.intervention == "baseline" or not EXP.capability["enabled"]:
        return []
    return [f"{OUT}/generations/{wildcards.model}/none/baseline.parquet"]
