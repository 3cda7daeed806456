"""Checks on what the config points at: files, prompt sets, layers, the device.

They run when the DAG is built (after the YAML itself validated), cheaply: local
prompt files are parsed (and the split sizes counted on them), layer numbers are checked against the
model's metadata (no weights loaded). Each problem is one ConfigError line.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError
from .experiment import Experiment
from .interventions.ablation import layer_range
from .offline import hub_cache_dir
from .paths import resolve_data_path
from .prompts import draw, load_instructions
from .sources import _hub_cached_config, check_source, model_metadata
from .specs import DatasetSpec, ModelSpec


def check_rule_picks(exp: Experiment) -> None:
    """direction.generate_picks needs the rules' scores, which a forced direction skips."""
    if not exp.direction.generate_picks:
        return
    for name in exp.models:
        if exp.direction_choice(name)[2]:
            raise ConfigError(exp.file, "direction.generate_picks", f"the direction of {name} is forced (no rule "
                              "scores its candidates, so there is no pick to generate); drop the force or set "
                              "generate_picks: false")


def check_experiment(exp: Experiment, device_here: bool = True) -> None:
    """`device_here`: jobs run on this machine, so `device: cuda` must find a GPU here."""
    for spec in [*exp.models.values(), *exp.judges.values()]:
        check_source(spec)
    for spec in exp.judges.values():
        check_judge_loads_offline(spec, exp.results_dir / "models" / spec.name)
    check_prompt_sets(exp)
    exp.meta = {m: model_metadata(spec, exp.results_dir / "models" / m) or {} for m, spec in exp.models.items()}
    check_model_facts(exp)
    check_pairs(exp)
    check_layers(exp)
    check_rule_picks(exp)
    check_sweep_counts(exp)
    check_capability_reference(exp)
    if device_here:
        check_device(exp.device, exp.file)
        check_dtypes(exp)


def check_judge_loads_offline(spec: ModelSpec, prepared_dir: Path) -> None:
    """A hub judge must be loadable when the hub is offline: prepared already, or its snapshot in the local hub
    cache. Otherwise its prepare job would fail, possibly only after hours of generation (the score jobs are the
    first to need it), so this stops the run now. Experiment models need no such check: generation waits for them.
    Whether an online hub is reachable is not asked here (no network while the DAG is built)."""
    if spec.source.kind != "hub":
        return
    from .models import PREPARED, hub_offline  # torch, only for hub judges

    try:
        where = json.loads((prepared_dir / PREPARED).read_text())["load_from"]
    except (OSError, ValueError, KeyError, TypeError):
        where = None
    if where is not None and (where == "." or Path(where).is_dir()):
        return
    if not hub_offline() or _hub_cached_config(spec):
        return
    repo, rev = spec.source.hub, spec.source.revision
    fetch = f"hf download {repo}" + (f" --revision {rev}" if rev else "")
    raise ConfigError(spec.file, "source.hub", f"the judge {repo} at revision {rev or 'main'} is neither prepared "
                      f"({prepared_dir}) nor in the local hub cache {hub_cache_dir()}, and the hub is offline "
                      f"(HF_HUB_OFFLINE): fetch it once with network access (`{fetch}`), point source.path at a "
                      "local copy, or leave the judge out of `scoring`")


def check_prompt_sets(exp: Experiment) -> None:
    """Every local prompt file parsed now, as the prompts job will parse it (check_prompt_file); then the
    split sizes counted on them, by the job's own draw, as far as they are known before the hub sets
    download (pipeline/prompts.draw)."""
    parsed: dict[DatasetSpec, tuple[list[dict], dict[str, int]]] = {}

    def load(ds: DatasetSpec):
        if ds.path is None:
            return None  # a hub or URL set: checked in the prompts job, before it writes
        if ds not in parsed:
            parsed[ds] = check_prompt_file(ds)
        return parsed[ds]

    for splits in exp.dataset_splits.values():  # every file, an excluded one too, before any count
        for ds in (ds for pool in splits.values() for ds in pool):
            load(ds)
    draw(exp.dataset_splits, exp.split, exp.file, load)


def check_prompt_file(ds: DatasetSpec) -> tuple[list[dict], dict[str, int]]:
    """Parse a local prompt file (JSON Lines, a JSON array of objects, or CSV with a header): UTF-8,
    records that are objects or rows as long as the header, every key the dataset YAML names a column, the
    field present, no repeated instruction or id. Returns its prompts and the rows dropped by reason."""
    return load_instructions(ds)


def check_pairs(exp: Experiment) -> None:
    """Refuse a pair whose hidden sizes differ (from metadata, or the YAML's hidden_size)."""
    for i, (base, chat) in enumerate(exp.pairs):
        sizes = [exp.meta[m].get("hidden_size") or exp.models[m].source.hidden_size for m in (base, chat)]
        if None not in sizes and sizes[0] != sizes[1]:
            raise ConfigError(exp.file, f"pairs[{i}]",
                              f"hidden sizes differ ({base}: {sizes[0]}, {chat}: {sizes[1]}); a direction cannot transfer")


def check_layers(exp: Experiment) -> None:
    """Every layer the config names exists in every model it applies to."""
    iv = exp.intervention
    for name, spec in exp.models.items():
        n = exp.meta[name].get("n_layers")
        if not n:
            continue

        def need(layer: int | None, file: str, key: str, what: str = "layer") -> None:
            if layer is not None and not 0 <= layer < n:
                raise ConfigError(file, key, f"{what} {layer} does not exist in {name} (layers 0..{n - 1})")

        layer, _, forced = exp.direction_choice(name)
        force_index = next((i for i, f in enumerate(exp.direction.force) if f.model == name), None)
        if force_index is not None:
            need(layer, exp.file, f"direction.force[{force_index}].layer")
        elif forced:
            need(layer, spec.file, "direction.layer")
        for value in exp.direction.selection.layer_set() or ():
            need(value, exp.file, "direction.selection.layers")
        added = iv["addition"]
        offset, absolute = added.layer.offset, added.layer.absolute
        need(absolute, iv.file, "addition.layer.absolute", "addition layer")
        if forced and offset is not None and added.coefficients:
            need(layer + offset, iv.file, "addition.layer.offset", f"addition layer {layer}{offset:+d} =")
        elif offset and absolute is None and added.coefficients:
            # the layer is selected later, among these: at least one must leave the target inside the model
            rules = exp.direction.selection
            candidates = [x for x in (rules.layer_set() or range(n)) if x < int(rules.max_layer_fraction * n)]
            if candidates and not any(0 <= x + offset < n for x in candidates):
                raise ConfigError(iv.file, "addition.layer.offset", f"{offset:+d} puts the addition "
                                  f"outside {name} (blocks 0..{n - 1}) from every layer selection may pick "
                                  f"({min(candidates)}..{max(candidates)})")
        ablated = layer_range(iv["ablation"])
        if ablated is not None and ablated[1] > n:
            raise ConfigError(iv.file, "ablation.layers.stop",
                              f"{ablated[1]} is past the last block of {name} ({n} blocks)")
        if exp.sweep is not None and name in exp.sweep.models:
            for value in exp.sweep.extraction_layers or ():
                need(value, exp.file, "sweep.extraction_layers")
            for i, (e, a, _) in enumerate(exp.sweep.cells):
                need(e, exp.file, f"sweep.generate.cells[{i}].layer")
                need(a, exp.file, f"sweep.generate.cells[{i}].addition_layer")


def check_dtypes(exp: Experiment) -> None:
    """A model YAML's dtype that this machine's device cannot run (bfloat16 on a pre-Ampere GPU) stops here,
    before any job; torch is imported only when some model names bfloat16."""
    specs = [*exp.models.values(), *exp.judges.values()]
    if exp.device == "cpu" or not any(spec.dtype == "bfloat16" for spec in specs):
        return
    import torch

    from .models import dtype_problem, pick_device

    device = pick_device(exp.device)
    for spec in specs:
        problem = dtype_problem(getattr(torch, spec.dtype), device) if spec.dtype != "auto" else None
        if problem:
            raise ConfigError(spec.file, "dtype", problem)


def check_device(device: str, file: str) -> None:
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(file, "device", "cuda, but no CUDA device is visible here (use auto or cpu)")


def check_model_facts(exp: Experiment) -> None:
    """What a model YAML says of a model agrees with the model's own config: its hidden size (pairs and
    directions are sized by it) and at least one block."""
    for name, spec in exp.models.items():
        meta = exp.meta[name]
        declared = spec.source.hidden_size
        if declared and meta.get("hidden_size") and declared != meta["hidden_size"]:
            raise ConfigError(spec.file, "source.hidden_size", f"{declared}, but {name}'s config says "
                              f"{meta['hidden_size']}: remove the key or correct it")
        if meta.get("n_layers") is not None and meta["n_layers"] < 1:
            raise ConfigError(spec.file, "source", f"{name}'s config has {meta['n_layers']} blocks: the residual "
                              "stream needs at least one")


def check_sweep_counts(exp: Experiment) -> None:
    """Offsets that reach no block, and more picks than the sweep has cells (the picks would repeat)."""
    sweep = exp.sweep
    if sweep is None:
        return
    for name in sweep.models:
        n = exp.meta[name].get("n_layers")
        if not n:
            continue
        layers = sweep.extraction_layers if sweep.extraction_layers is not None else range(n)
        for offset in (o for o in sweep.offsets if o != 0):  # 0 is always swept (the same-layer comparison)
            if not any(0 <= e + offset < n for e in layers):
                raise ConfigError(exp.file, "sweep.addition_offsets", f"{offset:+d} puts every addition "
                                  f"target outside {name} (blocks 0..{n - 1}) for extraction layers "
                                  f"{min(layers)}..{max(layers)}")
        cells = len({(e, e + o, c) for e in layers for o in sweep.offsets for c in sweep.coefficients
                     if 0 <= e + o < n})
        if sweep.top + sweep.spread > cells:
            key = "sweep.generate.top" if sweep.top > cells else "sweep.generate.spread"
            raise ConfigError(exp.file, key, f"top {sweep.top} + spread {sweep.spread} picks, but the sweep of "
                              f"{name} has {cells} addition cells: picks would repeat")
        if sweep.ablation and sweep.top_ablation > len(layers):
            raise ConfigError(exp.file, "sweep.generate.top_ablation", f"{sweep.top_ablation} picks, but the sweep "
                              f"of {name} has {len(layers)} ablation cells (one per extraction layer)")


def check_capability_reference(exp: Experiment) -> None:
    """The capability reference answers: JSON Lines of {instruction, response}, read now, not in a job."""
    if not exp.capability.enabled:
        return
    path = resolve_data_path(exp.capability.reference)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(exp.file, "capability.reference", f"cannot read {path}: {err}") from None
    rows = 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(exp.file, "capability.reference", f"{path} line {n}: not JSON (JSON Lines of "
                              "{\"instruction\": ..., \"response\": ...} expected)") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "response")):
            raise ConfigError(exp.file, "capability.reference", f"{path} line {n}: needs string fields "
                              "'instruction' and 'response'")
        rows += 1
    if rows == 0:
        raise ConfigError(exp.file, "capability.reference", f"{path} has no reference answers")
