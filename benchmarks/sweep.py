"""The sweep's cells per second: a full nnsight pass per cell (the path before `prefix.edited_passes`)
beside each addition's pass started at its block, in one run, on the default experiment's val prompts.

    .venv/bin/python benchmarks/sweep.py                        # the embedded Qwen, CPU, default + full sweep
    .venv/bin/python benchmarks/sweep.py --model tiny-chat      # a tiny random model, seconds
    .venv/bin/python benchmarks/sweep.py --device cuda --dtype bfloat16

Two sweeps: the default experiment's (extraction layers 12-18, offsets -3..0, coefficient 2) and the
full one (every extraction layer, offsets -8..+2). Each is what `sweep.score_cells` computes: the
unsteered harmless and harmful scores and one score per addition cell (the ablation cells reuse
selection's bypass scores). The directions are random vectors of a difference of means' typical norm:
the cost does not depend on them, and both paths score the same ones, compared score by score.

Before, every cell costs one whole pass, so on a long sweep the old path is timed on `--old-cells`
of its cells, spread over the addition blocks, and its rate is cells per second over those. The
"limit" column is what skipping the blocks before each addition allows when a block costs the same
at every depth and nothing else costs anything: passes of the old path / block-passes of the new.
The "floor" column is the same ratio for the least any exact method computes: no padding (the
prompts' real tokens only) and, in the last block, only each prompt's last position (its logits are
all the score reads) — an upper bound on what any exact speed-up could give this sweep.

Last, whether cells batched as rows would pay: one unedited pass over the harmless prompts repeated
`--rows` times (as many cells' rows in one batch) against the same pass over them once.
"""

from __future__ import annotations

import argparse
import time

import polars as pl
import torch

from common import load_for_benchmark
from pipeline import prompts
from pipeline.config import load_experiment
from pipeline.interventions import Edit, make_edit
from pipeline.prefix import edited_passes
from pipeline.probes import last_logits
from pipeline.refusal import refusal_score, refusal_token_ids
from pipeline.templates import encode_prompt


def default_cells(n_layers: int) -> list[tuple[int, int]]:
    """(extraction layer, addition block) of conf/experiment/default.yaml's sweep on a 24-block model,
    scaled to `n_layers` (the tiny models have 4)."""
    lo, hi = round(12 * n_layers / 24), round(19 * n_layers / 24)
    return [(e, e + o) for e in range(lo, hi) for o in (-3, -2, -1, 0) if 0 <= e + o < n_layers]


def full_cells(n_layers: int) -> list[tuple[int, int]]:
    return [(e, e + o) for e in range(n_layers) for o in range(-8, 3) if 0 <= e + o < n_layers]


def val_prompts(n: int | None) -> tuple[list[str], list[str]]:
    exp = load_experiment([])
    table = pl.from_arrow(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file))
    val = table.filter(pl.col("split") == "val")
    pick = lambda label: val.filter(pl.col("label") == label)["instruction"].to_list()[:n]  # noqa: E731
    return pick("harmful"), pick("harmless")


def old_path(lm, ids, harmful, harmless, edits, batch_size) -> list[float]:
    """One nnsight pass per cell (what sweep.score_cells ran before): the two baselines, then each edit."""
    score = lambda texts, e: refusal_score(last_logits(lm, texts, e, batch_size), ids).mean().item()  # noqa: E731
    return [score(harmful, Edit()), score(harmless, Edit())] + [score(harmless, e) for e in edits]


def new_path(lm, ids, harmful, harmless, edits, batch_size) -> list[float]:
    per_row = lambda logits: refusal_score(logits, ids)  # noqa: E731
    [(unsteered_harmful, _)] = edited_passes(lm, harmful, [Edit()], batch_size, per_row=per_row)
    passes = edited_passes(lm, harmless, [Edit(), *edits], batch_size, per_row=per_row)
    return [unsteered_harmful.mean().item()] + [s.mean().item() for s, _ in passes]


def token_slots(lm, texts: list[str], batch_size: int) -> tuple[int, int]:
    """(padded token slots of the batches the passes run, real tokens) of the prompts."""
    lengths = [len(encode_prompt(lm.tok, lm.spec, t)) for t in texts]
    chunks = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(max(c) * len(c) for c in chunks), sum(lengths)


def floor_ratio(lm, harmful, harmless, cells, batch_size) -> float:
    """Old cost / the least an exact method computes, in token-blocks (attention and the head left out)."""
    n = lm.rmap.n_layers
    (padded_harmful, real_harmful), (padded_harmless, real_harmless) = (
        token_slots(lm, harmful, batch_size), token_slots(lm, harmless, batch_size))
    old = n * (padded_harmful + padded_harmless * (1 + len(cells)))
    least = n * (real_harmful + real_harmless) + sum(real_harmless * (n - a - 1) + len(harmless) for _, a in cells)
    return old / least


def spread(items: list, k: int) -> list[int]:
    """Indices of k items spread evenly over the list (all of them when k >= len)."""
    if k >= len(items):
        return list(range(len(items)))
    return sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=None, help="val prompts a label (default: the experiment's 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--old-cells", type=int, default=24, help="cells the old path is timed on in the full sweep")
    ap.add_argument("--sweeps", nargs="+", default=["default", "full"], choices=["default", "full"])
    ap.add_argument("--rows", type=int, default=4, help="cells a batch in the rows comparison (0: skip it)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="override the model YAML's dtype, e.g. bfloat16")
    args = ap.parse_args()

    lm = load_for_benchmark(args.model, args.device, args.dtype)
    harmful, harmless = val_prompts(args.prompts)
    ids = refusal_token_ids(lm.tok, lm.spec)
    n = lm.rmap.n_layers
    gen = torch.Generator().manual_seed(0)
    vectors = {e: torch.randn(lm.rmap.hidden_size, generator=gen) * 0.1 * lm.rmap.hidden_size ** 0.5
               for e in range(n)}
    print(f"model {args.model} on {lm.device} ({next(lm.hf.parameters()).dtype}), {n} blocks, "
          f"{len(harmless)} harmless + {len(harmful)} harmful val prompts, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    old_path(lm, ids, harmful[:2], harmless[:2], [], 2)  # warm-up
    print(f"{'sweep':>8s} {'cells':>5s} {'old s':>7s} {'old cells/s':>11s} {'new s':>7s} {'new cells/s':>11s} "
          f"{'new/old':>7s} {'limit':>6s} {'floor':>6s} {'max |score diff|':>16s}")
    for name in args.sweeps:
        cells = (default_cells if name == "default" else full_cells)(n)
        edits = [make_edit("addition", direction=vectors[e], layer=a, coefficient=2.0) for e, a in cells]
        timed = spread(cells, args.old_cells) if name == "full" else list(range(len(cells)))
        t = time.perf_counter()
        old = old_path(lm, ids, harmful, harmless, [edits[i] for i in timed], args.batch_size)
        old_s = time.perf_counter() - t
        t = time.perf_counter()
        new = new_path(lm, ids, harmful, harmless, edits, args.batch_size)
        new_s = time.perf_counter() - t
        # scored per cell: the baselines plus each addition; the old rate over the cells it ran
        old_rate, new_rate = (2 + len(timed)) / old_s, (2 + len(cells)) / new_s
        # the old path scored the baselines and the timed cells only: compare those
        mine = new[:2] + [new[2 + i] for i in timed]
        diff = max(abs(a - b) for a, b in zip(old, mine, strict=True))
        limit = (2 + len(cells)) / (2 + sum((n - a) / n for _, a in cells))
        floor = floor_ratio(lm, harmful, harmless, cells, args.batch_size)
        sampled = "" if len(timed) == len(cells) else f" (old timed on {len(timed)})"
        print(f"{name:>8s} {len(cells):5d} {old_s:7.1f} {old_rate:11.3f} {new_s:7.1f} {new_rate:11.3f} "
              f"{new_rate / old_rate:7.2f} {limit:6.2f} {floor:6.2f} {diff:16.2e}{sampled}")
    if args.rows > 1:
        one = min(timeit(lambda: edited_passes(lm, harmless, [Edit()], len(harmless))) for _ in range(2))
        many = min(timeit(lambda: edited_passes(lm, harmless * args.rows, [Edit()], len(harmless) * args.rows))
                   for _ in range(2))
        print(f"cells as rows: {len(harmless)} rows a pass {one:.2f} s; {args.rows} x {len(harmless)} rows a pass "
              f"{many:.2f} s = {many / args.rows:.2f} s a cell ({one / (many / args.rows):.2f}x)")


def timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
