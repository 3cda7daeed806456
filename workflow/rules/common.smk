# Helpers shared by the rules: where each cell's files are, and the params several rules read.

PAIRED = sorted({m for pair in EXP.pairs for m in pair})  # models whose directions the report compares


def cell_path(kind, cell):
    return f"{OUT}/{kind}/{cell.model}/{cell.source}/{cell.name}.parquet"


def grid_files(kind):
    return [cell_path(kind, c) for c in EXP.cells()]


def model_params(wildcards):
    return to_params(EXP.models[wildcards.model])


def sweep_outputs(kind):
    models = list(EXP.sweep.models) if EXP.sweep else []
    return [f"{OUT}/sweep/{m}/{kind}" for m in models]


def cell_direction_file(cell):
    """Where a cell's direction comes from: its own model, or the paired model; a rule's pick: the selection
    table, which says which candidate each rule picks."""
    if cell.source in ("none", "sweep"):
        return None
    if cell.source == "rule":
        return f"{OUT}/directions/{cell.model}/selection.parquet"
    if cell.source == "optimize":  # a trial edits the model's own selected direction, as the study did
        return f"{OUT}/directions/{cell.model}/selected.parquet"
    if source_method(cell.source):  # another direction method's, at the selected layer and position
        return f"{OUT}/directions/{cell.model}/other_methods.parquet"
    owner = cell.model if cell.source in ("self", "random") else cell.source
    return f"{OUT}/directions/{owner}/selected.parquet"


def cell_intervention(cell):
    """The intervention settings one cell reads (its kind's), so editing another kind's settings leaves it
    alone; a sweep pick reads the ablation's layer range (its ablation picks honour it); a trial of the optimize
    study (front<i>) the study's method, searched settings and fixed ones."""
    if cell.source == "optimize":
        s = EXP.optimize.settings
        return {"method": s.method, "params": sorted(s.params), "fixed": dict(s.fixed)}
    return EXP.intervention.cell_params("ablation" if cell.pick is not None else cell.kind)


def plugins_for(registry, names):
    """The experiment's plugins that registered the methods a job runs (`names` in `registry`): none for a
    job that runs built-in ones only, so adding a plugin reruns only the jobs that use it."""
    return plugins_providing(registry, names, EXP.plugins)
