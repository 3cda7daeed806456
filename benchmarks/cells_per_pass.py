"""Throughput of grid cells generated together: 8 cells (baseline, ablation, additions at several
coefficients and layers) run as 8 passes of 1 cell, 2 passes of 4, or 1 pass of 8 (one nnsight
invoke per cell, `generation.cells_per_pass`), in one run, side by side.

    .venv/bin/python benchmarks/cells_per_pass.py                          # the embedded Qwen, CPU
    .venv/bin/python benchmarks/cells_per_pass.py --model tiny-chat        # a tiny random model
    .venv/bin/python benchmarks/cells_per_pass.py --device cuda --dtype bfloat16 --prompts 64 --batch-size 64

Prints seconds for the 8 cells, cells per second and the speed-up over one cell per pass. Each
setting also checks that its completions equal the one-cell-per-pass ones, token for token.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import harmless_instructions, load_for_benchmark
from pipeline.generate import generate_many
from pipeline.interventions import Edit, make_edit



def eight_cells(hidden: int, n_layers: int) -> list[Edit]:
    d = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    mid = n_layers // 2
    return ([Edit(), make_edit("ablation", direction=d)]
            + [make_edit("addition", direction=d, layer=mid, coefficient=c) for c in (0.5, 1.0, 2.0)]
            + [make_edit("addition", direction=d, layer=layer, coefficient=1.0) for layer in (mid - 2, mid - 1)]
            + [make_edit("addition", direction=d, layer=mid, coefficient=1.0, normalize=True)])


def run(lm, texts, cells, per_pass, new_tokens, batch_size):
    out = []
    for start in range(0, len(cells), per_pass):
        out += generate_many(lm, texts, cells[start:start + per_pass], new_tokens, batch_size)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per cell in a pass")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--per-pass", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="override the model YAML's dtype, e.g. bfloat16")
    args = ap.parse_args()

    lm = load_for_benchmark(args.model, args.device, args.dtype)
    texts = harmless_instructions(args.prompts)
    cells = eight_cells(lm.rmap.hidden_size, lm.rmap.n_layers)
    print(f"model {args.model} on {lm.device} ({next(lm.hf.parameters()).dtype}), {len(cells)} cells x "
          f"{len(texts)} prompts, {args.batch_size} prompts per cell per pass, {args.new_tokens} new tokens, "
          f"best of {args.repeats}")
    generate_many(lm, texts[:2], cells[:2], 2, 2)  # warm-up
    times, outputs = {}, {}
    for k in args.per_pass:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            outputs[k] = run(lm, texts, cells, k, args.new_tokens, args.batch_size)
            best = min(best, time.perf_counter() - t)
        times[k] = best
    first = args.per_pass[0]
    print(f"{'cells per pass':>14s} {'rows per pass':>13s} {'seconds':>8s} {'cells/s':>8s} "
          f"{'x ' + str(first) + ' per pass':>12s} {'same tokens':>11s}")
    for k, t in times.items():
        same = all(a[1] == b[1] for a, b in zip(outputs[k], outputs[first]))
        print(f"{k:14d} {k * min(args.batch_size, len(texts)):13d} {t:8.2f} {len(cells) / t:8.3f} "
              f"{times[first] / t:12.2f} {str(same):>11s}")


if __name__ == "__main__":
    main()
