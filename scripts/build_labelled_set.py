#!/usr/bin/env python3
"""Build the labelled completions set (pipeline/data/labelled_completions.jsonl).

Two steps:

    .venv/bin/python scripts/build_labelled_set.py generate [--threads 2]
    .venv/bin/python scripts/build_labelled_set.py merge

`generate` runs the embedded models (qwen2.5-coder-0.5b-instruct, gemma-3-270m) through the
pipeline's own generate function on the cells in CELLS below (baseline, ablation, additions from
gentle to model-breaking) and writes one JSON Lines file per cell under results/labelled/cells/.
It reads what a default run made (`make run`): the prepared models (results/models/), the test
split (results/default/prompts.parquet) and the directions (results/default/directions/). Greedy
decoding in float32 on the CPU, so a rerun writes the same text; a cell already on disk is kept.

`merge` joins those completions with the hand labels in pipeline/data/labelled_labels.tsv (one
row per completion: model, cell, prompt_id, quality, refused, an optional note) and writes the
set. It stops if a completion has no label, or a label no completion: the labels were given by
reading each text (pipeline/data/labelled_README.md says how).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN, GEMMA = "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
QUALITIES = ("fluent_refusal", "fluent_answer", "broken")
PER_LABEL = 4  # prompts of each label per cell; cells rotate through the 32 test prompts
MAX_NEW_TOKENS = 40  # enough to see a model break, cheap on two cores


@dataclass(frozen=True)
class LabelledCell:
    model: str
    name: str
    kind: str  # baseline | ablation | addition
    source: str = "self"  # self | random: the default run's selected directions
    coefficient: float = 0.0
    layer: int | None = None  # addition block; None: the direction's extraction layer
    candidate: tuple[int, int] | None = None  # (layer, position) of another candidate direction
    normalize: bool = False
    form: str = "block_input"


def _cells() -> list[LabelledCell]:
    c = LabelledCell
    cells = [c(QWEN, "baseline", "baseline"), c(QWEN, "ablation", "ablation"),
             c(QWEN, "ablation_random", "ablation", source="random")]
    # Qwen's raw direction (layer 13) has norm 3.1: +2 already refuses; ~+10 and up break the model
    cells += [c(QWEN, f"addition_{k:g}", "addition", coefficient=k) for k in (1, 2, 4, 6, 8, 12, 16, 20, 30)]
    cells += [c(QWEN, "addition_-4", "addition", coefficient=-4.0),
              c(QWEN, "addition_8_L6", "addition", coefficient=8.0, layer=6),
              c(QWEN, "addition_4_L18", "addition", coefficient=4.0, layer=18),
              c(QWEN, "addition_20_L20", "addition", coefficient=20.0, layer=20),
              c(QWEN, "random_8", "addition", source="random", coefficient=8.0),
              c(QWEN, "random_20", "addition", source="random", coefficient=20.0),
              c(QWEN, "cand17_3", "addition", coefficient=3.0, candidate=(17, -1))]
    cells += [c(GEMMA, "baseline", "baseline"), c(GEMMA, "ablation", "ablation")]
    # Gemma's raw direction (layer 9) has norm 128: the base model's residual stream is large
    cells += [c(GEMMA, f"addition_{k:g}", "addition", coefficient=k) for k in (2, 4, 8, 16)]
    cells += [c(GEMMA, "every_write_2", "addition", coefficient=2.0, form="every_write"),
              c(GEMMA, "addition_4_L3", "addition", coefficient=4.0, layer=3),
              c(GEMMA, "random_4", "addition", source="random", coefficient=4.0)]
    # appended (a cell's prompts follow its index): where fluent refusals turn into broken text
    cells += [c(QWEN, f"addition_{k:g}", "addition", coefficient=k) for k in (3, 5, -10)]
    cells += [c(QWEN, "cand15_3_L12", "addition", coefficient=3.0, candidate=(15, -1), layer=12),
              c(GEMMA, "addition_1", "addition", coefficient=1.0),
              c(GEMMA, "random_16", "addition", source="random", coefficient=16.0)]
    return cells


CELLS = _cells()


def cell_path(out: Path, cell: LabelledCell) -> Path:
    return out / "cells" / cell.model / f"{cell.name}.jsonl"


def test_prompts(prompts_path: Path, index: int):
    """PER_LABEL harmful and PER_LABEL harmless test prompts, a different slice for each cell."""
    import polars as pl

    test = pl.read_parquet(prompts_path).filter(pl.col("split") == "test")
    rows = []
    for label in ("harmful", "harmless"):
        sub = test.filter(pl.col("label") == label).sort("prompt_id")
        start = (index * PER_LABEL) % sub.height
        picked = [(start + i) % sub.height for i in range(PER_LABEL)]
        rows += [sub.row(i, named=True) for i in picked]
    return rows


def intervention_of(cell: LabelledCell, directions: Path):
    from pipeline.generate import candidate_direction, load_direction
    from pipeline.interventions import Edit, make_edit

    if cell.kind == "baseline":
        return Edit(), {}
    direction, layer, position, _ = load_direction(str(directions / cell.model / "selected.parquet"), cell.source)
    if cell.candidate is not None:
        layer, position = cell.candidate
        direction = candidate_direction(str(directions / cell.model / "candidates.parquet"), layer, position)
    meta = {"extraction_layer": layer, "extraction_position": position, "source": cell.source}
    if cell.kind == "ablation":
        return make_edit("ablation", direction=direction), meta
    at = layer if cell.layer is None else cell.layer
    meta |= {"addition_layer": at, "coefficient": cell.coefficient, "form": cell.form}
    return make_edit("addition", direction=direction, layer=at, coefficient=cell.coefficient,
                        normalize=cell.normalize, form=cell.form), meta


def generate(args) -> None:
    from pipeline.atomic import write_text
    from pipeline.config import DEFAULT_CONF_DIR, load_model
    from pipeline.generate import generate as run_generate
    from pipeline.models import LoadedModel, set_offline

    set_offline()
    out, default = Path(args.out), Path(args.default)
    for model in dict.fromkeys(c.model for c in CELLS):
        todo = [(i, c) for i, c in enumerate(CELLS) if c.model == model and not cell_path(out, c).exists()]
        if not todo:
            continue
        spec = load_model(model, Path(DEFAULT_CONF_DIR), "scripts/build_labelled_set.py", "model")
        lm = LoadedModel(spec, ROOT / "results" / "models" / model, "cpu", args.threads)
        for index, cell in todo:
            rows = test_prompts(default / "prompts.parquet", index)
            iv, meta = intervention_of(cell, default / "directions")
            texts = run_generate(lm, [r["instruction"] for r in rows], iv, args.max_new_tokens, len(rows))
            lines = [json.dumps({"model": model, "cell": cell.name, "intervention": cell.kind, **meta,
                                 "prompt_id": r["prompt_id"], "label": r["label"], "instruction": r["instruction"],
                                 "completion": t}, ensure_ascii=False) for r, t in zip(rows, texts)]
            write_text("\n".join(lines) + "\n", cell_path(out, cell))
            print(f"{model} {cell.name}: {len(lines)} completions", flush=True)


def read_cells(out: Path) -> list[dict]:
    rows = []
    for cell in CELLS:
        path = cell_path(out, cell)
        if not path.exists():
            raise SystemExit(f"{path}: missing; run `generate` first")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line]
    return rows


def read_labels(path: Path) -> dict[tuple[str, str, str], dict]:
    labels = {}
    with path.open(newline="") as f:
        for n, r in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            if r["quality"] not in QUALITIES or r["refused"] not in ("refused", "complied"):
                raise SystemExit(f"{path}:{n}: quality must be one of {QUALITIES}, refused refused|complied")
            labels[(r["model"], r["cell"], r["prompt_id"])] = r
    return labels


def merge(args) -> None:
    from pipeline.atomic import write_text

    rows, labels = read_cells(Path(args.out)), read_labels(Path(args.labels))
    keys = {(r["model"], r["cell"], r["prompt_id"]) for r in rows}
    missing, extra = keys - labels.keys(), labels.keys() - keys
    if missing or extra:
        raise SystemExit(f"{len(missing)} completions without a label (e.g. {sorted(missing)[:3]}), "
                         f"{len(extra)} labels without a completion (e.g. {sorted(extra)[:3]})")
    out = []
    for r in rows:
        lab = labels[(r["model"], r["cell"], r["prompt_id"])]
        out.append(json.dumps({**r, "quality": lab["quality"], "refused": lab["refused"] == "refused",
                               "note": lab.get("note") or ""}, ensure_ascii=False))
    write_text("\n".join(out) + "\n", args.dataset)
    print(f"{args.dataset}: {len(out)} labelled completions ({date.today()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    m = sub.add_parser("merge")
    m.add_argument("--labels", default=str(ROOT / "pipeline" / "data" / "labelled_labels.tsv"))
    m.add_argument("--dataset", default=str(ROOT / "pipeline" / "data" / "labelled_completions.jsonl"))
    for p in (g, m):
        p.add_argument("--out", default=str(ROOT / "results" / "labelled"))
        p.add_argument("--default", default=str(ROOT / "results" / "default"),
                       help="the default run: prompts.parquet and directions/")
    args = parser.parse_args()
    generate(args) if args.step == "generate" else merge(args)


if __name__ == "__main__":
    main()
