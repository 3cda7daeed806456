"""Generation speed: plain transformers vs nnsight, plain vs steered, in one run; and what one
sweep cell costs (the logit refusal score: one forward pass, no generation) beside one generated cell.

    python benchmarks/generation.py                       # the embedded Qwen model
    python benchmarks/generation.py --model tiny-chat     # a tiny random model, seconds

Prints seconds per run and each variant's ratio to plain `generate`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from common import harmless_instructions, load_for_benchmark
from pipeline.generate import generate
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import torch_hooks
from pipeline.models import stop_token_ids
from pipeline.probes import last_logits
from pipeline.templates import encode_batch



def hooks_generate(lm, texts, iv, n, batch_size):
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=lm.tok.pad_token_id,
                           eos_token_id=sorted(stop_token_ids(lm.hf, lm.tok)))
    for start in range(0, len(texts), batch_size):
        kwargs = lm.inputs(encode_batch(lm.tok, lm.spec, texts[start:start + batch_size]))
        kwargs.pop("position_ids")
        with torch.no_grad(), torch_hooks(lm.hf, lm.rmap, iv):
            lm.hf.generate(**kwargs, generation_config=cfg)


def timed(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="override the model YAML's dtype, e.g. bfloat16")
    args = ap.parse_args()

    lm = load_for_benchmark(args.model, args.device, args.dtype)
    texts = harmless_instructions(args.prompts)
    d = torch.randn(lm.rmap.hidden_size)
    layer = lm.rmap.n_layers // 2
    n, bs = args.new_tokens, args.batch_size
    ablation = make_edit("ablation", direction=d)
    addition = make_edit("addition", direction=d, layer=layer, coefficient=1.0)

    variants = {
        "transformers generate (no edit)": lambda: hooks_generate(lm, texts, Edit(), n, bs),
        "nnsight generate (no edit)": lambda: generate(lm, texts, Edit(), n, bs),
        "torch hooks, ablation": lambda: hooks_generate(lm, texts, ablation, n, bs),
        "nnsight, ablation": lambda: generate(lm, texts, ablation, n, bs),
        "torch hooks, addition": lambda: hooks_generate(lm, texts, addition, n, bs),
        "nnsight, addition": lambda: generate(lm, texts, addition, n, bs),
        "sweep cell: logit score, addition": lambda: last_logits(lm, texts, addition, bs),
    }
    print(f"model {args.model} on {lm.device}, {len(texts)} prompts, batch {bs}, {n} new tokens, "
          f"best of {args.repeats}")
    times = {name: timed(fn, args.repeats) for name, fn in variants.items()}
    ref = times["transformers generate (no edit)"]
    print(f"{'variant':34s} {'seconds':>8s} {'x plain':>8s} {'tokens/s':>9s}")
    for name, t in times.items():
        rate = "-" if name.startswith("sweep") else f"{len(texts) * n / t:.1f}"
        print(f"{name:34s} {t:8.2f} {t / ref:8.2f} {rate:>9s}")


if __name__ == "__main__":
    main()
