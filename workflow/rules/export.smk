# Export: a weight-edit cell (orthogonalization, norm_preserving, kernel, ...) written as a standard Hugging Face
# model folder, results/<experiment>/export/<model>/<cell>/, to load anywhere, upload or quantise. The cells with
# the model's own direction (source self), and the optimize study's generated trials (front1, ...: source
# optimize, the model's own direction too) when its method edits weights; not part of `all`:
#   snakemake --cores 2 --config overrides="experiment=tiny" export
#
# A hook-only cell asked for by its path (export/tiny-chat/addition_2) gets a job with no input, which refuses
# it in one line at once instead of first generating the cell.

EXPORT_SHARD = "2GB"  # safetensors shard size: below the 4 GB some tools and filesystems stop at


def exported_cell(wildcards):
    """The grid cell an export folder is for: front<i> names the optimize study's trial, any other name a cell of
    the model's own direction; None if the grid has none."""
    source = Source.OPTIMIZE if wildcards.cell.startswith(FRONT_PREFIX) else Source.SELF
    try:
        return EXP.cell(wildcards.model, source, wildcards.cell)
    except KeyError:
        return None


def exportable(cell):
    return cell is not None and INTERVENTIONS.get(cell.kind).edit_class.edits_weights


def export_inputs(wildcards):
    cell = exported_cell(wildcards)
    if not exportable(cell):
        return {"direction": [], "generations": []}
    base = Cell(cell.model, "none", "baseline")
    front = cell.source == Source.OPTIMIZE
    return {
        "model": f"{MODELS}/{cell.model}",
        "direction": cell_direction_file(cell),
        # the completions the folder reproduces: the export follows the cell
        "generations": cell_path("generations", cell),
        "scores": [cell_path("scores", cell)],
        "capability": [cell_path("capability", cell)] if EXP.capability.enabled else [],
        "baseline_scores": [cell_path("scores", base)] if base in EXP.cells() else [],
        "candidates": [f"{OUT}/directions/{cell.model}/candidates.parquet"],
        # a front cell's edit is its trial's settings, read from the study's tables as its generate job reads them
        "trials": [f"{OUT}/optimize/{cell.model}/trials.parquet"] if front else [],
        "pareto": [f"{OUT}/optimize/{cell.model}/pareto.parquet"] if front else [],
    }


def export_targets():
    return [f"{OUT}/export/{c.model}/{c.name}" for c in EXP.cells()
            if c.source in (Source.SELF, Source.OPTIMIZE) and exportable(c)]


rule export:
    """Every weight-edit cell of the grid with the model's own direction (the optimize study's generated trials
    included) as a Hugging Face model folder."""
    input:
        export_targets(),


rule export_cell:
    """One cell's edited weights, tokenizer with the prompt format as chat template, greedy generation config and a
    model card."""
    input:
        unpack(export_inputs),
    output:
        directory(OUT + "/export/{model}/{cell}"),
    params:
        cell=lambda w: to_params(exported_cell(w)) if exported_cell(w) else None,
        intervention=lambda w: cell_intervention(exported_cell(w)) if exported_cell(w) else None,
        model=model_params,
        # what changes the completions the card describes (the speed knobs change none)
        generation={k: v for k, v in to_params(EXP.generation).items() if k not in SPEED_KNOBS},
        experiment=EXP.name,
        device=EXP.device,
        file=EXP.file,
        max_shard_size=EXPORT_SHARD,
        plugins=lambda w: plugins_for(INTERVENTIONS, [exported_cell(w).kind]) if exported_cell(w) else [],
    log:
        LOGS + "/export/{model}/{cell}.log",
    threads: EXP.threads
    resources:
        gpu=GPU,
    script:
        "../scripts/export.py"
