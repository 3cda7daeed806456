"""Stage 1: load the harmful and harmless instruction sets and split them.

Sets load through `datasets` (local JSON Lines files, or a hub id when a hub is
reachable). Each set is shuffled with the experiment's seed and cut into train /
val / test, so the same config always gives the same prompts.
"""

from __future__ import annotations

import random

import pyarrow as pa

from .config import DatasetSpec, Experiment
from .errors import ConfigError
from .schemas import PROMPTS, write_parquet


def load_instructions(spec: DatasetSpec) -> list[dict]:
    """Rows of {prompt_id, category, instruction} from one dataset config."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if spec.path is not None:
            ds = datasets.load_dataset("json", data_files=spec.path, split="train")
        else:
            ds = datasets.load_dataset(spec.hub_id, spec.subset, split=spec.split)
    except Exception as err:
        where = "path" if spec.path else "hub_id"
        what = spec.path or spec.hub_id
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(spec.file, where, f"cannot load '{what}' ({reason}); "
                          "a hub dataset needs a reachable hub or a local copy given as path") from None
    if spec.field not in ds.column_names:
        raise ConfigError(spec.file, "field", f"column '{spec.field}' not in {ds.column_names}")
    rows = []
    for i, rec in enumerate(ds):
        text = rec[spec.field]
        if spec.filter_empty and rec.get(spec.filter_empty):
            continue  # e.g. Alpaca rows whose instruction needs an extra input
        if not isinstance(text, str) or not text.strip():
            continue
        pid = str(rec[spec.id_field]) if spec.id_field else f"{spec.name}-{i:05d}"
        cat = str(rec[spec.category_field]) if spec.category_field and rec.get(spec.category_field) else ""
        rows.append({"prompt_id": pid, "category": cat, "instruction": text.strip()})
    if not rows:
        raise ConfigError(spec.file, spec.field, "the prompt set is empty")
    return rows


def split_rows(rows: list[dict], n_train: int, n_val: int, n_test: int, seed: int,
               spec: DatasetSpec, exp_file: str) -> dict[str, list[dict]]:
    need = n_train + n_val + n_test
    if len(rows) < need:
        raise ConfigError(exp_file, "split", f"{spec.label} set '{spec.name}' has {len(rows)} prompts, "
                          f"train+val+test asks for {need}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked = [rows[i] for i in order[:need]]
    return {"train": picked[:n_train], "val": picked[n_train:n_train + n_val],
            "test": picked[n_train + n_val:]}


def build_prompts(exp: Experiment) -> pa.Table:
    records = []
    s = exp.split
    for label, spec in exp.datasets.items():
        parts = split_rows(load_instructions(spec), s["train"], s["val"], s["test"], s["seed"], spec, exp.file)
        for split, rows in parts.items():
            for r in rows:
                records.append({**r, "label": label, "split": split, "dataset": spec.name})
    return pa.Table.from_pylist(records, schema=PROMPTS)


def run(exp: Experiment, output: str) -> None:
    write_parquet(build_prompts(exp), output)
