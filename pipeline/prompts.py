"""Stage 1: load the harmful and harmless instruction sets and split them.

Sets load through `datasets` (local JSON Lines or CSV files, a hub id or a URL
when the network is reachable). Each set, or pool of sets, is shuffled with the
experiment's seed and cut into train / val / test, so the same config always
gives the same prompts.
"""

from __future__ import annotations

import json
import logging
import math
import random

import pyarrow as pa

from .config import Split
from .errors import ConfigError
from .schemas import PROMPTS, write_parquet
from .specs import DatasetSpec

log = logging.getLogger(__name__)


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
        if spec.filter_empty and str(rec.get(spec.filter_empty) or "").strip():
            continue  # e.g. Alpaca rows whose instruction needs an extra input (whitespace is empty, as both papers' code reads it)
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


def holdout_indices(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) row indices exactly as scikit-learn's `train_test_split(range(n),
    test_size=test_fraction, random_state=seed)` returns them: one draw of numpy's legacy seeded
    permutation, the first ceil(fraction x n) held out, the rest kept, each in permutation order."""
    import numpy as np

    n_test = math.ceil(test_fraction * n)
    order = np.random.RandomState(seed).permutation(n).tolist()
    return order[n_test:], order[:n_test]


def split_holdout(rows: list[dict], split: Split, name: str, label: str, exp_file: str) -> dict[str, list[dict]]:
    """The base-models post's split of one set: train (then val) from the start of the kept part, test
    from the start of the held-out part. No repeats are removed first, as the post's code removes none:
    dropping one would shift every index after it."""
    kept, held = holdout_indices(len(rows), split.test_fraction, split.seed)
    for part, have, need in (("train+val", len(kept), split.train + split.val), ("test", len(held), split.test)):
        if have < need:
            raise ConfigError(exp_file, "split", f"{label} set '{name}' has {len(rows)} usable prompts: its "
                              f"{part} part holds {have}, the split asks for {need}")
    train_val = [rows[i] for i in kept[:split.train + split.val]]
    return {"train": train_val[:split.train], "val": train_val[split.train:], "test": [rows[i] for i in held[:split.test]]}


def build_prompts(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split,
                  exp_file: str) -> pa.Table:
    """Each label's splits, from one set or pool (shuffled and cut) or from several (e.g. test on another
    benchmark).

    The test set is drawn first and kept whole. A split drawn from another pool then drops every
    instruction of the pools drawn before it (the whole sets, not only what was drawn from them) and of
    the label's `exclude` sets (case- and whitespace-insensitive). So a benchmark that overlaps the
    training set (JailbreakBench repeats AdvBench goals word for word) cannot leak, and, as in the
    direction paper, the overlap is removed from the train pool, not from the test set. A pool also
    drops its own repeats, so no instruction is drawn twice; with `split.pool_cap`, each set of a
    pool first gives a seeded sample of at most that many prompts.

    With `split.mode: train_test_split` each label's one set is cut as the base-models post cuts it
    (`split_holdout`); nothing is dropped.
    """
    records, stats = [], []
    for label, by_split in dataset_splits.items():
        if split.mode == "train_test_split":
            spec = by_split["train"][0]
            rows = [{**r, "dataset": spec.name} for r in load_instructions(spec)]
            parts = split_holdout(rows, split, spec.name, label, exp_file)
            kept, held = holdout_indices(len(rows), split.test_fraction, split.seed)
            stats.append({"label": label, "splits": "train+val+test", "dataset": spec.name, "loaded": len(rows),
                          "kept": len(kept), "held_out": len(held)})
            records += [{**r, "label": label, "split": part} for part in ("train", "val", "test") for r in parts[part]]
            continue
        groups: dict[tuple[str, ...], tuple] = {}  # pool -> (its sets, its splits), test's pool first
        for part in ("test", "val", "train"):
            pool = by_split[part]
            groups.setdefault(tuple(s.name for s in pool), (pool, []))[1].append(part)
        banned: set[str] = set()
        for k, (names, (pool, splits)) in enumerate(groups.items()):
            rows = []
            for spec in pool:
                loaded = load_instructions(spec)
                sampled = loaded
                if split.pool_cap is not None and len(pool) > 1 and len(loaded) > split.pool_cap:
                    sampled = random.Random(split.seed).sample(loaded, split.pool_cap)
                kept = 0
                for r in sampled:
                    key = _norm(r["instruction"])
                    if key not in banned:
                        rows.append({**r, "dataset": spec.name})
                        banned.add(key)
                        kept += 1
                stats.append({"label": label, "splits": "+".join(splits), "dataset": spec.name,
                              "loaded": len(loaded), "sampled": len(sampled), "kept": kept})
            counts = [getattr(split, s) if s in splits else 0 for s in ("train", "val", "test")]
            parts = split_rows(rows, *counts, split.seed, "+".join(names), label, exp_file)
            for part in splits:
                records += [{**r, "label": label, "split": part} for r in parts[part]]
            if k == 0:  # after the test set: the excluded sets are off limits for every later pool
                for spec in by_split.get("exclude", ()):
                    banned |= {_norm(r["instruction"]) for r in load_instructions(spec)}
    for s in stats:
        log.info("%s %s: %s", s["label"], s["splits"], ", ".join(f"{k} {v}" for k, v in s.items()
                                                                     if k not in ("label", "splits")))
    table = pa.Table.from_pylist(records, schema=PROMPTS)
    # What each set gave its pool (loaded, capped, kept after repeats and excluded sets), for the record.
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"pools": json.dumps(stats).encode()})


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def run(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split, output: str, *, exp_file: str) -> None:
    write_parquet(build_prompts(dataset_splits, split, exp_file), output)
