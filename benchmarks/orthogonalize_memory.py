"""Peak extra memory of weight orthogonalisation with restore: full state-dict clone vs `orthogonalized`.

Each method runs in a fresh subprocess on a randomly initialised Qwen2 of the embedded 0.5B
model's shape (float32, no download). The extra memory is the peak resident set size during
edit + restore minus the resident set size just before it (Linux: VmHWM is reset through
/proc/self/clear_refs, so the model's own construction does not count).

    .venv/bin/python benchmarks/orthogonalize_memory.py            # tied embeddings, as Qwen2.5-0.5B
    .venv/bin/python benchmarks/orthogonalize_memory.py --untied
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.orthogonalize import orthogonalize, orthogonalized  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512)
METHODS = ("state_dict_clone", "context_manager")
GIB = 2**30


def old_way(model, direction):
    """What generate._orthogonalize did: clone every tensor, edit in place, load the clone back."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    orthogonalize(model, direction)
    model.load_state_dict(original)


def new_way(model, direction):
    with orthogonalized(model, direction):
        pass


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def weights_digest(model) -> str:
    h = hashlib.blake2b()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(memoryview(v.detach().contiguous().numpy()))  # no copy of the bytes
    return h.hexdigest()


def measure(method: str, tied: bool) -> dict:
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(**QWEN2_05B, tie_word_embeddings=tied)).eval()
    direction = torch.randn(QWEN2_05B["hidden_size"])
    digest = weights_digest(model)
    model_bytes = sum(p.nbytes for p in model.parameters())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse cannot hide new allocations
    base = proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    {"state_dict_clone": old_way, "context_manager": new_way}[method](model, direction)
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    return dict(method=method, model_bytes=model_bytes, extra_bytes=peak - base, seconds=seconds,
                restored=weights_digest(model) == digest,
                tied_after=model.lm_head.weight is model.get_input_embeddings().weight)


def in_subprocess(method: str, tied: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", method] + ([] if tied else ["--untied"])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: list[dict], tied: bool) -> None:
    old, new = results
    print(f"Qwen2 {QWEN2_05B['hidden_size']}h x {QWEN2_05B['num_hidden_layers']}L, vocab {QWEN2_05B['vocab_size']}, "
          f"float32, {'tied' if tied else 'untied'} embeddings: parameters {old['model_bytes'] / GIB:.2f} GiB")
    print(f"{'method':<18}{'peak extra RSS':>16}{'seconds':>10}{'restored':>10}{'tied after':>12}")
    for r in results:
        print(f"{r['method']:<18}{r['extra_bytes'] / GIB:>12.2f} GiB{r['seconds']:>10.1f}"
              f"{str(r['restored']):>10}{str(r['tied_after']):>12}")
    print(f"ratio state_dict_clone / context_manager: {old['extra_bytes'] / new['extra_bytes']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--untied", action="store_true", help="untied lm_head (default: tied, as Qwen2.5-0.5B)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(4)
    if args.child:
        print(json.dumps(measure(args.child, not args.untied)))
    else:
        report([in_subprocess(m, not args.untied) for m in METHODS], not args.untied)


if __name__ == "__main__":
    main()
