"""Stage 1: load the harmful and harmless instruction sets and split them.

Sets load through `datasets` (local JSON Lines or CSV files, a hub id or a URL
when the network is reachable). Each set, or pool of sets, is shuffled with the
experiment's seed and cut into train / val / test, so the same config always
gives the same prompts.
"""

from __future__ import annotations

import random

import pyarrow as pa

from .config import Split
from .errors import ConfigError
from .schemas import PROMPTS, write_parquet
from .specs import DatasetSpec


def load_instructions(spec: DatasetSpec) -> list[dict]:
    """Rows of {prompt_id, category, instruction} from one dataset config."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if spec.hub_id is None:
            ds = datasets.load_dataset(spec.format, data_files=spec.path or spec.url, split="train")
        else:
            ds = datasets.load_dataset(spec.hub_id, spec.subset, split=spec.split)
    except Exception as err:
        where = "path" if spec.path else "url" if spec.url else "hub_id"
        what = spec.path or spec.url or spec.hub_id
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(spec.file, where, f"cannot load '{what}' ({reason}); "
                          "a hub or web dataset needs the network, or a local copy given as path") from None
    for key, column in [("field", spec.field), *((f"where.{c}", c) for c, _ in spec.where)]:
        if column not in ds.column_names:
            raise ConfigError(spec.file, key, f"column '{column}' not in {ds.column_names}")
    rows = []
    for i, rec in enumerate(ds):
        text = rec[spec.field]
        if spec.filter_empty and rec.get(spec.filter_empty):
            continue  # e.g. Alpaca rows whose instruction needs an extra input
        if any(str(rec[c]) != v for c, v in spec.where):
            continue  # e.g. HarmBench's contextual rows, which need their context string
        if not isinstance(text, str) or not text.strip():
            continue
        pid = str(rec[spec.id_field]) if spec.id_field else f"{spec.name}-{i:05d}"
        cat = str(rec[spec.category_field]) if spec.category_field and rec.get(spec.category_field) else ""
        rows.append({"prompt_id": pid, "category": cat, "instruction": text.strip()})
    if not rows:
        raise ConfigError(spec.file, spec.field, "the prompt set is empty")
    return rows


def split_rows(rows: list[dict], n_train: int, n_val: int, n_test: int, seed: int,
               pool: str, label: str, exp_file: str) -> dict[str, list[dict]]:
    need = n_train + n_val + n_test
    if len(rows) < need:
        asked = "+".join(k for k, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n)
        raise ConfigError(exp_file, "split", f"{label} set '{pool}' has {len(rows)} usable prompts, "
                          f"{asked} asks for {need}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked = [rows[i] for i in order[:need]]
    return {"train": picked[:n_train], "val": picked[n_train:n_train + n_val],
            "test": picked[n_train + n_val:]}


def build_prompts(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split,
                  exp_file: str) -> pa.Table:
    """Each label's splits, from one set or pool (shuffled and cut) or from several (e.g. test on another
    benchmark).

    The test set is drawn first and kept whole; a split drawn from another set then drops
    every instruction already drawn (case- and whitespace-insensitive). So a benchmark
    that overlaps the training set (JailbreakBench repeats AdvBench goals word for word)
    cannot leak, and, as in the direction paper, the overlap is removed from the train
    pool, not from the test set. A pool also drops its own repeats, so no instruction is
    drawn twice.
    """
    records = []
    for label, by_split in dataset_splits.items():
        groups: dict[tuple[str, ...], tuple] = {}  # pool -> (its sets, its splits), test's pool first
        for part in ("test", "val", "train"):
            pool = by_split[part]
            groups.setdefault(tuple(s.name for s in pool), (pool, []))[1].append(part)
        seen: set[str] = set()
        for names, (pool, splits) in groups.items():
            rows = []
            for spec in pool:
                for r in load_instructions(spec):
                    key = _norm(r["instruction"])
                    if key not in seen:
                        rows.append({**r, "dataset": spec.name})
                        seen.add(key)
            counts = [getattr(split, k) if k in splits else 0 for k in ("train", "val", "test")]
            parts = split_rows(rows, *counts, split.seed, "+".join(names), label, exp_file)
            for part in splits:
                records += [{**r, "label": label, "split": part} for r in parts[part]]
            # Later pools must not repeat what this one drew; what it left undrawn is free again.
            seen = {_norm(r["instruction"]) for r in records if r["label"] == label}
    return pa.Table.from_pylist(records, schema=PROMPTS)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def run(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split, output: str, *, exp_file: str) -> None:
    write_parquet(build_prompts(dataset_splits, split, exp_file), output)
