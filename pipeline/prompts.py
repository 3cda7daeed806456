"""Stage 1: load the harmful and harmless instruction sets and split them.

A local file (JSON Lines, a JSON array of objects, or CSV with a header row) is parsed here, by the
code that also checks it while the DAG is built (checks.check_prompt_sets); a hub id or a URL loads
through `datasets` when the network is reachable. Each set, or pool of sets, is shuffled with the
experiment's seed and cut into train / val / test, so the same config always gives the same prompts.

One rule for every format: a row the dataset YAML's `filter_empty` or `where` rules out, and a row
whose instruction is blank, is dropped; so is, in a pool, a repeat, a prompt of a pool drawn before
and one of an `exclude` set. Every drop is counted by reason, in the rule's log and in
prompts.parquet's `pools` metadata. A local file that repeats an instruction (case and whitespace
aside) or an id is refused, whatever its format: a repeat there is a mistake to fix in the file. A hub
or URL set cannot be fixed here, so its repeats are dropped by its pool (counted as `repeat`), or, in
`train_test_split` mode, kept as the base-models post keeps them (counted as `repeats_kept`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from .errors import ConfigError
from .schemas import PROMPTS, write_parquet
from .specs import DatasetSpec

if TYPE_CHECKING:  # in annotations only: config checks prompt sets with this module (checks.py)
    from .config import Split

log = logging.getLogger(__name__)

LOAD_DROPS = ("filter_empty", "where", "blank")  # why a row of a set gives no prompt, in the order tested
POOL_DROPS = ("repeat", "drawn_before", "excluded")  # why a pool leaves out one of a set's prompts

# (rows, dropped by reason) of one set, or None where the set is not known yet (a hub set, at DAG build)
Loader = Callable[[DatasetSpec], "tuple[list[dict], dict[str, int]] | None"]


def load_instructions(spec: DatasetSpec) -> tuple[list[dict], dict[str, int]]:
    """Rows of {prompt_id, category, instruction} from one dataset config, and how many rows each rule
    in LOAD_DROPS dropped."""
    if spec.path is not None:
        records, columns = read_local(spec)
        return usable_rows(records, columns, spec, local=True)
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        if spec.hub_id is None:
            ds = datasets.load_dataset(spec.format, data_files=spec.url, split="train")
        else:
            ds = datasets.load_dataset(spec.hub_id, spec.subset, split=spec.split)
    except Exception as err:
        where = "url" if spec.url else "hub_id"
        what = spec.url or spec.hub_id
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(spec.file, where, f"cannot load '{what}' ({reason}); "
                          "a hub or web dataset needs the network, or a local copy given as path") from None
    return usable_rows(enumerate(ds), ds.column_names, spec, local=False)


def read_local(spec: DatasetSpec) -> tuple[list[tuple[int, dict]], list[str]]:
    """A local prompt file's records, each with the line it starts on, and the set's columns (a CSV's
    header; in JSON, every key some record has, as `datasets` reads it)."""
    path = Path(spec.path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(spec.file, "path", f"cannot read {path}: {err.strerror}") from None
    data = data.removeprefix(codecs.BOM_UTF8)  # spreadsheets write one; it is no part of the first key
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(spec.file, "path", f"{path.name} line {line}: not UTF-8 text") from None
    if spec.format == "csv":
        return _csv_records(text, path.name, spec.file)
    records = (_json_array if text.lstrip().startswith("[") else _json_lines)(text, path.name, spec.file)
    columns = list(dict.fromkeys(k for _, rec in records for k in rec))
    return records, columns


def _json_lines(text: str, name: str, file: str) -> list[tuple[int, dict]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            if _is_json_object(text):  # a pretty-printed object: name the formats that are read
                raise ConfigError(file, "path", f"{name} is one JSON object: give JSON Lines (an object per "
                                  "line) or a JSON array of objects") from None
            raise ConfigError(file, "path", f"{name} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise ConfigError(file, "path", f"{name} line {n}: a line must be a JSON object")
        records.append((n, rec))
    return records


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(text: str, name: str, file: str) -> list[tuple[int, dict]]:
    """The objects of a JSON array, each with its line (found by decoding the items one by one)."""
    try:
        json.loads(text)  # first the whole file, for a clean message on where it is broken
    except ValueError as err:
        raise ConfigError(file, "path", f"{name} line {err.lineno}: not valid JSON ({err.msg})") from None
    decoder, records = json.JSONDecoder(), []
    i, pos, line = _JSON_SPACE.match(text).end() + 1, 0, 1  # just past the '['
    while True:
        i = _JSON_SPACE.match(text, i).end()
        if text[i] == "]":
            return records
        line, pos = line + text.count("\n", pos, i), i
        rec, i = decoder.raw_decode(text, i)
        if not isinstance(rec, dict):
            raise ConfigError(file, "path", f"{name} line {line}: an item of the array must be a JSON object")
        records.append((line, rec))
        i = _JSON_SPACE.match(text, i).end()
        i += text[i] == ","


def _csv_records(text: str, name: str, file: str) -> tuple[list[tuple[int, dict]], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    records, header, start = [], None, 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if header is None:
                header = row
                twice = next((c for c in header if header.count(c) > 1), None)
                if twice is not None:  # a dict per row would keep only the last of the two
                    raise ConfigError(file, "path", f"{name} line {line}: column '{twice}' is named twice "
                                      "in the header")
            elif len(row) != len(header):  # columns would shift silently
                raise ConfigError(file, "path", f"{name} line {line}: {len(row)} cells, the header has "
                                  f"{len(header)}")
            else:
                records.append((line, dict(zip(header, row))))
    except csv.Error as err:
        raise ConfigError(file, "path", f"{name} line {reader.line_num}: not valid CSV ({err})") from None
    return records, header or []


def usable_rows(records: Iterable[tuple[int, dict]], columns: list[str], spec: DatasetSpec,
                local: bool) -> tuple[list[dict], dict[str, int]]:
    """The set's prompts from its records ((line, record) of a local file, (index, row) of a hub set),
    and the rows dropped by each reason of LOAD_DROPS. A key of the dataset YAML naming no column is an
    error, not a filter that keeps everything (or nothing)."""
    name = Path(spec.path).name if local else spec.hub_id or spec.url
    place = "line" if local else "row"
    if local and not records:
        raise ConfigError(spec.file, "path", f"{name} is empty: the prompt set has no prompt")
    named = [("field", spec.field), ("id_field", spec.id_field), ("category_field", spec.category_field),
             ("filter_empty", spec.filter_empty), *((f"where.{c}", c) for c in spec.where)]
    for key, column in named:
        if column is not None and column not in columns:
            raise ConfigError(spec.file, key, f"column '{column}' not in {name}'s columns {list(columns)}")
    dropped = dict.fromkeys(LOAD_DROPS, 0)
    rows, seen_text, seen_id = [], {}, {}
    for i, (n, rec) in enumerate(records):
        for key, column in (("field", spec.field), ("id_field", spec.id_field)):
            if column is not None and column not in rec:  # a JSON record may lack a key others have
                raise ConfigError(spec.file, key, f"{name} {place} {n}: no '{column}' key")
        text = rec[spec.field]
        if text is not None and not isinstance(text, str):
            raise ConfigError(spec.file, "field", f"{name} {place} {n}: '{spec.field}' is not a string")
        if spec.filter_empty and str(rec.get(spec.filter_empty) or "").strip():
            # e.g. Alpaca rows whose instruction needs an extra input (whitespace is empty, as both papers' code reads it)
            dropped["filter_empty"] += 1
            continue
        if any(str(rec.get(c)) != v for c, v in spec.where.items()):
            dropped["where"] += 1  # e.g. HarmBench's contextual rows, which need their context string
            continue
        if text is None or not text.strip():  # null, an empty CSV cell, or whitespace
            dropped["blank"] += 1
            continue
        if local:
            norm = _norm(text)
            if norm in seen_text:
                raise ConfigError(spec.file, "path", f"{name} line {n}: duplicate prompt (as line {seen_text[norm]})")
            seen_text[norm] = n
        pid = str(rec[spec.id_field]) if spec.id_field else f"{spec.name}-{i:05d}"
        if spec.id_field:  # two prompts under one id would be joined as one downstream
            if pid in seen_id:
                raise ConfigError(spec.file, "id_field", f"{name} {place} {n}: duplicate id {pid!r} "
                                  f"(as {place} {seen_id[pid]})")
            seen_id[pid] = n
        cat = str(rec[spec.category_field]) if spec.category_field and rec.get(spec.category_field) else ""
        rows.append({"prompt_id": pid, "category": cat, "instruction": text.strip()})
    if not rows and not any(dropped.values()):
        raise ConfigError(spec.file, "hub_id" if spec.hub_id else "url",
                          f"{name} is empty: the prompt set has no prompt")
    if not rows:
        why = max(dropped, key=dropped.get)
        key = {"blank": "field", "filter_empty": "filter_empty", "where": "where"}[why]
        raise ConfigError(spec.file, key, f"the prompt set {name} has no usable prompt: of its rows, "
                          + ", ".join(f"{v} dropped as {k}" for k, v in dropped.items() if v))
    return rows, dropped


def split_rows(rows: list[dict], n_train: int, n_val: int, n_test: int, seed: int,
               pool: str, label: str, exp_file: str, exact: bool = True) -> dict[str, list[dict]]:
    """`exact` False: sets drawn before are not known yet (DAG build), so `rows` may still lose some."""
    need = n_train + n_val + n_test
    if len(rows) < need:
        asked = "+".join(k for k, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n)
        raise ConfigError(exp_file, _short_split(len(rows), (("train", n_train), ("val", n_val), ("test", n_test))),
                          f"{label} set '{pool}' has {'' if exact else 'at most '}{len(rows)} usable prompts, "
                          f"{asked} asks for {need}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked = [rows[i] for i in order[:need]]
    return {"train": picked[:n_train], "val": picked[n_train:n_train + n_val],
            "test": picked[n_train + n_val:]}


def _short_split(have: int, asked: Iterable[tuple[str, int]]) -> str:
    """The key of the first split, in the order they are cut, that the prompts do not fill."""
    total = 0
    for name, n in asked:
        total += n
        if n and total > have:
            return f"split.{name}"
    return "split"


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
    for part, have, asked in (("train+val", len(kept), (("train", split.train), ("val", split.val))),
                              ("test", len(held), (("test", split.test),))):
        need = sum(n for _, n in asked)
        if have < need:
            raise ConfigError(exp_file, _short_split(have, asked), f"{label} set '{name}' has {len(rows)} usable "
                              f"prompts: its {part} part holds {have}, the split asks for {need}")
    train_val = [rows[i] for i in kept[:split.train + split.val]]
    return {"train": train_val[:split.train], "val": train_val[split.train:], "test": [rows[i] for i in held[:split.test]]}


def build_prompts(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split,
                  exp_file: str) -> pa.Table:
    """Each label's splits (`draw`), with what each set gave its pool as the `pools` metadata."""
    records, stats = draw(dataset_splits, split, exp_file, load_instructions)
    for s in stats:
        counts = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("label", "splits", "dropped"))
        drops = ", ".join(f"{v} {k}" for k, v in s["dropped"].items() if v) or "none"
        log.info("%s %s: %s; dropped %s", s["label"], s["splits"], counts, drops)
    table = pa.Table.from_pylist(records, schema=PROMPTS)
    # What each set gave its pool (loaded, capped, kept) and what it dropped, by reason, for the record.
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"pools": json.dumps(stats).encode()})


def draw(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split, exp_file: str,
         load: Loader) -> tuple[list[dict], list[dict]]:
    """Each label's splits, from one set or pool (shuffled and cut) or from several (e.g. test on another
    benchmark): the prompt records and, per set, what it gave.

    The test set is drawn first and kept whole. A split drawn from another pool then drops every
    instruction of the pools drawn before it (the whole sets, not only what was drawn from them) and of
    the label's `exclude` sets (case- and whitespace-insensitive). So a benchmark that overlaps the
    training set (JailbreakBench repeats AdvBench goals word for word) cannot leak, and, as in the
    direction paper, the overlap is removed from the train pool, not from the test set. A pool also
    drops its own repeats, so no instruction is drawn twice; with `split.pool_cap`, each set of a
    pool first gives a seeded sample of at most that many prompts.

    With `split.mode: train_test_split` each label's one set is cut as the base-models post cuts it
    (`split_holdout`); nothing is dropped after loading.

    The DAG build runs this too (checks.check_prompt_sets), with a `load` that knows only the local
    files: a pool with a set not known yet is skipped, and the pools after it are counted as if it
    dropped nothing (an upper bound), so a split too large for them is refused before any job.
    """
    records, stats = [], []
    for label, by_split in dataset_splits.items():
        if split.mode == "train_test_split":
            spec = by_split["train"][0]
            got = load(spec)
            if got is None:
                continue
            rows = [{**r, "dataset": spec.name} for r in got[0]]
            parts = split_holdout(rows, split, spec.name, label, exp_file)
            kept, held = holdout_indices(len(rows), split.test_fraction, split.seed)
            stats.append({"label": label, "splits": "train+val+test", "dataset": spec.name, "loaded": len(rows),
                          "kept": len(kept), "held_out": len(held), "dropped": dict(got[1]),
                          "repeats_kept": len(rows) - len({_norm(r["instruction"]) for r in rows})})
            records += [{**r, "label": label, "split": part} for part in ("train", "val", "test") for r in parts[part]]
            continue
        groups: dict[tuple[str, ...], tuple] = {}  # pool -> (its sets, its splits), test's pool first
        for part in ("test", "val", "train"):
            pool = by_split[part]
            groups.setdefault(tuple(s.name for s in pool), (pool, []))[1].append(part)
        before: dict[str, str] = {}  # instruction -> why a later pool drops it: drawn_before or excluded
        exact = True
        for k, (names, (pool, splits)) in enumerate(groups.items()):
            sets = [load(spec) for spec in pool]
            if None in sets:
                exact = False  # its prompts are unknown, so what it takes from later pools is too
            else:
                rows, seen = [], set()
                for spec, (loaded, load_drops) in zip(pool, sets):
                    sampled = loaded
                    if split.pool_cap is not None and len(pool) > 1 and len(loaded) > split.pool_cap:
                        sampled = random.Random(split.seed).sample(loaded, split.pool_cap)
                    dropped = {**load_drops, **dict.fromkeys(POOL_DROPS, 0)}
                    for r in sampled:
                        key = _norm(r["instruction"])
                        why = "repeat" if key in seen else before.get(key)
                        if why:
                            dropped[why] += 1
                            continue
                        seen.add(key)
                        rows.append({**r, "dataset": spec.name})
                    stats.append({"label": label, "splits": "+".join(splits), "dataset": spec.name,
                                  "loaded": len(loaded), "sampled": len(sampled),
                                  "kept": len(sampled) - sum(dropped[r] for r in POOL_DROPS), "dropped": dropped})
                counts = [getattr(split, s) if s in splits else 0 for s in ("train", "val", "test")]
                parts = split_rows(rows, *counts, split.seed, "+".join(names), label, exp_file, exact)
                for part in splits:
                    records += [{**r, "label": label, "split": part} for r in parts[part]]
                before.update(dict.fromkeys(seen, "drawn_before"))
            if k == 0:  # after the test set: the excluded sets are off limits for every later pool
                for spec in by_split.get("exclude", ()):
                    got = load(spec)
                    if got is None:
                        exact = False
                        continue
                    for r in got[0]:
                        before.setdefault(_norm(r["instruction"]), "excluded")
    return records, stats


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def run(dataset_splits: dict[str, dict[str, tuple[DatasetSpec, ...]]], split: Split, output: str, *, exp_file: str) -> None:
    write_parquet(build_prompts(dataset_splits, split, exp_file), output)
