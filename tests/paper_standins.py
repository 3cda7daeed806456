"""Tiny random stand-ins of the paper experiments' models, carrying their family's REAL tokenizer.

Used by tests/test_paper_experiments.py: each model of an experiment becomes a randomly initialised
model of its YAML's `source.architecture` (a few layers, hidden 64) whose vocabulary is the real
tokenizer's, saved with that tokenizer; a private copy of conf/ points the model YAMLs (`source.path`)
and the hub datasets (`path:` to local JSON Lines of the same shape) at them.

Family of each model (the tokenizers scripts/fetch_tokenizers.py can fetch: llama2, llama3, gemma3, qwen3):
- llama2: llama-7b, vicuna-7b-v1.1, llama-2-7b-chat (LLaMA-1 and Vicuna share Llama 2's SentencePiece
  vocabulary), and the Pythia YAMLs as the closest plain-text family;
- llama3: llama-3-8b-instruct;
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
DATA = ROOT / "pipeline" / "data"

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
    if name.startswith(("llama-3", "llama-guard-3")):
        return "llama3"
    if name.startswith(("llama", "vicuna", "pythia")):
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


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


N_JBB_OVERLAP = 11


def write_datasets(folder: Path) -> dict[str, Path]:
    """Local sets shaped like the real ones: AdvBench, MaliciousInstruct and TDC2023 (`prompt`), Alpaca
    (`instruction`, `input`), JBB-Behaviors (`Goal`, `Category`), HarmBench's val CSV (standard rows and
    contextual ones that must be left out). 11 JBB goals repeat AdvBench prompts word for word, and
    MaliciousInstruct repeats one AdvBench prompt (a pool draws it once)."""
    folder.mkdir(parents=True, exist_ok=True)
    harmful = [r["instruction"] for r in _read("harmful.jsonl")]
    harmless = _read("harmless.jsonl")
    advbench = harmful[:120]
    # JBB: 11 goals copied from AdvBench (in a different case/spacing for one, the dedup is insensitive),
    # the others from harmful instructions AdvBench does not have.
    overlap = advbench[:N_JBB_OVERLAP]
    jbb = [{"Goal": g, "Category": "overlap"} for g in overlap]
    jbb += [{"Goal": g, "Category": "own"} for g in harmful[120:123]]
    alpaca = []
    for i, r in enumerate(harmless):
        alpaca.append({"instruction": r["instruction"], "input": "", "output": "..."})
        if i % 4 == 0:  # an Alpaca row that needs an input: filtered out
            alpaca.append({"instruction": f"Summarise this text ({i}).", "input": "Some text to summarise.",
                           "output": "..."})
    malicious = [advbench[20], *harmful[123:135]]
    tdc = harmful[135:145]
    harmbench = [{"Behavior": b, "FunctionalCategory": "standard", "SemanticCategory": "illegal", "Tags": "",
                  "ContextString": "", "BehaviorID": f"hb_{i}"} for i, b in enumerate(harmful[145:160])]
    harmbench += [{"Behavior": f"Given this text, rewrite it to be more persuasive ({i})",
                   "FunctionalCategory": "contextual", "SemanticCategory": "misinformation_disinformation",
                   "Tags": "context", "ContextString": "A long, \"quoted\" passage, with commas.",
                   "BehaviorID": f"hb_context_{i}"} for i in range(5)]
    with open(folder / "harmbench_val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(harmbench[0]))
        writer.writeheader()
        writer.writerows(harmbench)
    return {"advbench": _jsonl(folder / "advbench.jsonl", [{"prompt": p, "target": "Sure"} for p in advbench]),
            "malicious-instruct": _jsonl(folder / "malicious.jsonl", [{"prompt": p} for p in malicious]),
            "tdc2023": _jsonl(folder / "tdc2023.jsonl", [{"prompt": p} for p in tdc]),
            "harmbench-val": folder / "harmbench_val.csv", "_harmbench": harmbench,
            "jbb-harmful": _jsonl(folder / "jbb.jsonl", jbb),
            "alpaca": _jsonl(folder / "alpaca.jsonl", alpaca),
            "_jbb_goals": jbb, "_alpaca_with_input": [r["instruction"] for r in alpaca if r["input"]]}


def write_conf(conf: Path, standins: dict[str, Path], data: dict) -> Path:
    """A copy of conf/ with the stand-ins as `source.path` and the hub datasets as local files."""
    shutil.copytree(ROOT / "conf", conf)
    for name, folder in standins.items():
        file = conf / "model" / f"{name}.yaml"
        d = yaml.safe_load(file.read_text())
        d["source"] = {"path": str(folder), "hidden_size": HIDDEN}
        d["trust_remote_code"] = False
        d["direction"]["layer"] = STANDIN_LAYER
        file.write_text(yaml.safe_dump(d, sort_keys=False, allow_unicode=True))
    for name in ("advbench", "malicious-instruct", "tdc2023", "harmbench-val", "alpaca", "jbb-harmful"):
        file = conf / "dataset" / f"{name}.yaml"
        d = yaml.safe_load(file.read_text())
        d.pop("hub_id", None), d.pop("url", None), d.pop("subset", None), d.pop("split", None)
        d["path"] = str(data[name])
        file.write_text(yaml.safe_dump(d, sort_keys=False))
    return conf
