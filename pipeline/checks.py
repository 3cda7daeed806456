"""Checks on what the config points at: files, prompt sets, layers, the device.

They run when the DAG is built (after the YAML itself validated), cheaply: local
prompt files are parsed line by line, layer numbers are checked against the
model's metadata (no weights loaded). Each problem is one ConfigError line.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import Experiment
from .errors import ConfigError
from .sources import check_source, model_metadata
from .specs import DatasetSpec, ModelSpec


def check_experiment(exp: Experiment, device_here: bool = True) -> None:
    """`device_here`: jobs run on this machine, so `device: cuda` must find a GPU here."""
    for spec in [*exp.models.values(), *exp.judges.values()]:
        check_source(spec)
    for spec in exp.judges.values():
        check_judge_loads_offline(spec, exp.results_dir / "models" / spec.name)
    checked = set()
    for splits in exp.dataset_splits.values():
        for ds in (ds for pool in splits.values() for ds in pool):
            if ds.path is not None and ds.format == "json" and ds.name not in checked:
                check_prompt_file(ds)
                checked.add(ds.name)
    exp.meta = {m: model_metadata(spec, exp.results_dir / "models" / m) or {} for m, spec in exp.models.items()}
    check_pairs(exp)
    check_layers(exp)
    if device_here:
        check_device(exp.device, exp.file)
        check_dtypes(exp)


def check_judge_loads_offline(spec: ModelSpec, prepared_dir: Path) -> None:
    """A hub judge must be loadable when the hub is offline: prepared already, or its snapshot in the local hub
    cache. Otherwise its prepare job would fail, possibly only after hours of generation (the score jobs are the
    first to need it), so this stops the run now. Experiment models need no such check: generation waits for them.
    Whether an online hub is reachable is not asked here (no network while the DAG is built)."""
    if spec.source_kind != "hub":
        return
    from .models import PREPARED, hub_offline  # torch, only for hub judges
    from .offline import hub_cache_dir
    from .sources import _hub_cached_config

    try:
        where = json.loads((prepared_dir / PREPARED).read_text())["load_from"]
    except (OSError, ValueError, KeyError, TypeError):
        where = None
    if where is not None and (where == "." or Path(where).is_dir()):
        return
    if not hub_offline() or _hub_cached_config(spec):
        return
    repo, rev = spec.source["hub"], spec.source.get("revision")
    fetch = f"hf download {repo}" + (f" --revision {rev}" if rev else "")
    raise ConfigError(spec.file, "source.hub", f"the judge {repo} at revision {rev or 'main'} is neither prepared "
                      f"({prepared_dir}) nor in the local hub cache {hub_cache_dir()}, and the hub is offline "
                      f"(HF_HUB_OFFLINE): fetch it once with network access (`{fetch}`), point source.path at a "
                      "local copy, or leave the judge out of `scoring`")


def check_prompt_file(ds: DatasetSpec) -> list[dict]:
    """Parse a local JSON Lines prompt set: UTF-8, one object per line, the field present, no duplicates."""
    path = Path(ds.path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ConfigError(ds.file, "path", f"{path.name} line {line}: not UTF-8 text") from None
    rows, seen_text, seen_id = [], {}, {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise ConfigError(ds.file, "path", f"{path.name} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise ConfigError(ds.file, "path", f"{path.name} line {n}: a line must be a JSON object")
        if ds.field not in rec:
            raise ConfigError(ds.file, "field", f"{path.name} line {n}: no '{ds.field}' key")
        value = rec[ds.field]
        if not isinstance(value, str):
            raise ConfigError(ds.file, "field", f"{path.name} line {n}: '{ds.field}' is not a string")
        norm = " ".join(value.lower().split())
        if norm in seen_text:
            raise ConfigError(ds.file, "path", f"{path.name} line {n}: duplicate prompt (as line {seen_text[norm]})")
        seen_text[norm] = n
        if ds.id_field:
            if ds.id_field not in rec:
                raise ConfigError(ds.file, "id_field", f"{path.name} line {n}: no '{ds.id_field}' key")
            pid = str(rec[ds.id_field])
            if pid in seen_id:
                raise ConfigError(ds.file, "id_field", f"{path.name} line {n}: duplicate id {pid!r} "
                                  f"(as line {seen_id[pid]})")
            seen_id[pid] = n
        rows.append(rec)
    if not rows:
        raise ConfigError(ds.file, "path", f"{path.name} is empty: the prompt set has no prompt")
    return rows


def check_pairs(exp: Experiment) -> None:
    """Refuse a pair whose hidden sizes differ (from metadata, or the YAML's hidden_size)."""
    for i, (base, chat) in enumerate(exp.pairs):
        sizes = [exp.meta[m].get("hidden_size") or exp.models[m].source.get("hidden_size") for m in (base, chat)]
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
        need(iv.addition_absolute, iv.file, "addition.layer.absolute", "addition layer")
        if forced and iv.addition_offset is not None and iv.coefficients:
            need(layer + iv.addition_offset, iv.file, "addition.layer.offset",
                 f"addition layer {layer}{iv.addition_offset:+d} =")
        if iv.ablation_layers is not None and iv.ablation_layers[1] > n:
            raise ConfigError(iv.file, "ablation.layers.stop",
                              f"{iv.ablation_layers[1]} is past the last block of {name} ({n} blocks)")
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
