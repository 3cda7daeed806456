# Helpers shared by the rules: the grid, the files each cell needs, and each rule's params.

PAIRED = sorted({m for pair in EXP.pairs for m in pair})  # models whose directions the report compares


def cell_path(kind, cell):
    return f"{OUT}/{kind}/{cell.model}/{cell.source}/{cell.name}.parquet"


def grid_files(kind):
    return [cell_path(kind, c) for c in EXP.cells()]


def model_params(wildcards):
    return to_params(EXP.models[wildcards.model])


def direction_file(wildcards):
    """Where a cell's direction comes from: its own model, or the paired model."""
    if wildcards.source in ("none", "sweep"):
        return []
    owner = wildcards.model if wildcards.source in ("self", "random") else wildcards.source
    return [f"{OUT}/directions/{owner}/selected.parquet"]


def baseline_file(wildcards):
    """Steered cells measure loss on the model's own baseline completions, so they need them first."""
    if wildcards.cell == "baseline" or wildcards.source == "sweep" or not EXP.capability.enabled:
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


def cell_intervention(wildcards):
    """The intervention settings one cell reads, so editing another cell's settings leaves it alone."""
    cell = EXP.cell(wildcards.model, wildcards.source, wildcards.cell)
    iv = EXP.intervention
    if cell.kind == "addition":
        params = {"normalize": iv.normalize, "addition_offset": iv.addition_offset,
                  "addition_absolute": iv.addition_absolute}
        # only when not the default, so cells generated before the option existed keep their params
        if iv.addition_form != "block_input":
            params["addition_form"] = iv.addition_form
        return params
    if cell.kind in ("ablation", "orthogonalization") or cell.pick is not None:
        return {"ablation_layers": iv.ablation_layers}
    return {}
