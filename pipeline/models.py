"""Preparing and loading models: hub ids, local paths, embedded GGUF, tiny random models.

`prepare` runs once per model (its own Snakemake rule) and leaves a directory
that every later job loads in seconds: for GGUF sources it assembles the parts,
verifies the SHA-256, dequantizes once (about a minute on a laptop CPU) and saves
safetensors; for `random_init` it trains a small tokenizer on the project's own
prompts and saves a seeded randomly initialised model; for hub ids it downloads a
snapshot (only what loading needs) into the hub cache and records its folder and
exact commit; for paths it records where to load from. Every later job loads from
local files with the hub libraries offline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from .architecture import get_path, residual_map
from .errors import ConfigError
from .offline import disable_telemetry, go_offline, hub_cache_dir
from .paths import resolve_data_path
from .sources import gguf_part_paths, model_metadata
from .specs import ModelSpec

PREPARED = "prepared.json"
log = logging.getLogger(__name__)


def set_offline(spec: ModelSpec | None = None, fetch: bool = False) -> None:
    """Telemetry off in every job; the hub libraries offline except while preparing (fetching) a hub model."""
    if fetch and spec is not None and spec.source.kind == "hub":
        disable_telemetry()
    else:
        go_offline()


def prepare(spec: ModelSpec, out_dir: str | Path) -> None:
    """Materialise the model into `out_dir`, atomically (built beside it, then renamed)."""
    set_offline(spec, fetch=True)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kind = spec.source.kind
        info = {"name": spec.name, "kind": kind}
        if kind == "gguf_parts":
            _prepare_gguf_cached(spec, tmp)
            info["load_from"] = "."
        elif kind == "random_init":
            _prepare_random(spec, tmp)
            info["load_from"] = "."
        elif kind == "hub":
            info.update(_prepare_hub(spec))
        else:
            info["load_from"] = str(Path(os.path.expanduser(spec.source.path)).resolve())
        (tmp / PREPARED).write_text(json.dumps(info, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ hub snapshots

# What loading needs besides the weights: config, tokenizer files, chat template.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.*"]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
# Subfolders (original/, onnx/, gguf/) and other formats are never loaded by transformers.
HUB_SKIP = ["*/*", "*.gguf", "*.onnx", "*.onnx_data", "*.pth", "*.pt", "*.msgpack", "*.h5", "*.ot",
            "consolidated*"]
COMMIT = re.compile(r"[0-9a-f]{40}")


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Offline if the environment says so now, or said so when huggingface_hub was imported."""
    from huggingface_hub import constants

    return _true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")) \
        or constants.HF_HUB_OFFLINE


def hub_patterns(files: list[str] | None, trust_remote_code: bool) -> tuple[list[str], list[str]]:
    """allow/ignore patterns for snapshot_download: one weight format, safetensors when the repo has it.

    `files` is the repo's listing, or None when unknown (offline with no cached listing, where the
    cache checks nothing against the patterns): then both formats are allowed."""
    allow = list(HUB_FILES) + (["*.py"] if trust_remote_code else [])
    top = set(files or ())
    if files is None:
        allow += SAFETENSORS + TORCH_BIN
    elif {"model.safetensors", "model.safetensors.index.json"} & top:
        allow += SAFETENSORS
    else:
        allow += TORCH_BIN
    return allow, list(HUB_SKIP)


def _prepare_hub(spec: ModelSpec) -> dict:
    """Download (or find in the cache) the pinned snapshot; record its folder and exact commit."""
    repo, wanted = spec.source.hub, spec.source.revision
    cache = hub_cache_dir()
    commit, files, online = _hub_listing(spec, repo, wanted, cache)
    allow, ignore = hub_patterns(files, spec.trust_remote_code)
    folder = _hub_snapshot(spec, repo, commit or wanted, cache, online, allow, ignore)
    _check_snapshot(spec, repo, folder)
    commit = folder.name  # the cache names each snapshot folder by its commit hash
    if wanted is None:
        log.warning("%s: source.hub %s has no revision, so it is unpinned; using commit %s "
                    "(add `revision: %s` to pin it)", spec.file, repo, commit, commit)
    return {"hub": repo, "load_from": str(folder), "revision": commit}


def _hub_listing(spec: ModelSpec, repo: str, revision: str | None, cache: Path):
    """(commit, file names, online): from the hub when reachable, else from the cache's listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not hub_offline():
        try:
            info = HfApi().repo_info(repo, revision=revision)
            return info.sha, [s.rfilename for s in info.siblings or []], True
        except HfHubHTTPError as err:
            # Unknown repo/revision, gated or private: say so; a hub outage (5xx) falls back to the cache.
            if (mapped := _hub_error(spec, repo, revision, cache, err)) is not None:
                raise mapped from None
        except _unreachable_errors():
            pass
    return None, _cached_listing(repo, revision, cache), False


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning 'no connection', for whichever HTTP client this huggingface_hub uses."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors = [ConnectionError, TimeoutError, OfflineModeIsEnabled]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(__import__(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _cached_listing(repo: str, revision: str | None, cache: Path) -> list[str] | None:
    """The repo's file names as cached by an earlier download, so offline uses the same patterns."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo, revision=revision, cache_dir=cache)]
    except Exception:  # no cached listing (or an older huggingface_hub): patterns then filter nothing
        return None


def _hub_snapshot(spec: ModelSpec, repo: str, revision: str | None, cache: Path, online: bool,
                  allow: list[str], ignore: list[str]) -> Path:
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache,
                                                   local_files_only=not online,
                                                   allow_patterns=allow, ignore_patterns=ignore)
    except Exception as err:
        if (mapped := _hub_error(spec, repo, revision, cache, err)) is not None:
            raise mapped from None
        raise
    return Path(folder)


def _hub_error(spec: ModelSpec, repo: str, revision: str | None, cache: Path, err: Exception):
    """The one-line ConfigError for a hub failure the user can fix, or None."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    rev = revision or "main"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, GatedRepoError):
        problem = f"{repo} is gated on the hub: accept its terms on huggingface.co, then log in (hf auth login)"
    elif isinstance(err, RepositoryNotFoundError):
        problem = f"the hub has no model {repo} (or it is private: log in with hf auth login)"
    elif isinstance(err, RevisionNotFoundError):
        problem = f"{repo} has no revision {rev} on the hub"
    elif isinstance(err, LocalEntryNotFoundError):
        problem = (f"{repo} at revision {rev} is not (fully) in the local hub cache {cache} and the hub cannot be "
                   f"reached; run once with network access (HF_HUB_OFFLINE unset), or fetch it with "
                   f"`hf download {repo} --revision {rev}`, or point HF_HUB_CACHE at a cache that has it")
    elif isinstance(err, HfHubHTTPError) and status in (401, 403):
        problem = f"the hub refused access to {repo} (HTTP {status}): log in with hf auth login"
    else:
        return None
    return ConfigError(spec.file, "source.hub", problem)


def _check_snapshot(spec: ModelSpec, repo: str, folder: Path) -> None:
    """A cached snapshot can be partial (interrupted download, no listing to check it against)."""
    names = {p.name for p in folder.iterdir()}
    weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    if not COMMIT.fullmatch(folder.name) or "config.json" not in names or not weights:
        raise ConfigError(spec.file, "source.hub",
                          f"the snapshot of {repo} at {folder} has no config.json or no weights; "
                          f"delete it and prepare again with network access")


def dequantized_cache(spec: ModelSpec) -> Path | None:
    """Where a GGUF model dequantized by this transformers and gguf is kept for other clones and results
    folders ($REFUSAL_CACHE_DIR, or ~/.cache/refusal-directions; empty: no cache). Keyed by the YAML's
    checksum, which the assembled parts were verified against before anything was stored."""
    from importlib.metadata import version

    root = os.environ.get("REFUSAL_CACHE_DIR", str(Path.home() / ".cache" / "refusal-directions"))
    if not root:
        return None
    key = f"{spec.source.sha256[:32]}-transformers{version('transformers')}-gguf{version('gguf')}"
    return Path(root).expanduser() / "dequantized" / key


def _prepare_gguf_cached(spec: ModelSpec, tmp: Path) -> None:
    """Dequantize once per machine: link the cached folder's files if it is there, else build and store
    them (minutes of CPU and 1-3 GB per model). Files are hard links where the filesystem allows: nothing
    writes a prepared folder in place, so the copies never diverge."""
    cache = dequantized_cache(spec)
    if cache is not None and cache.is_dir():
        _link_files(cache, tmp)
        return
    _prepare_gguf(spec, tmp)
    if cache is None:
        return
    staging = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True)
        _link_files(tmp, staging)
        os.replace(staging, cache)
    except OSError as err:  # a cache we cannot write (read-only home, full disk, another process won) is no cache
        log.info("not caching the dequantized %s: %s", spec.name, err)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)
        except OSError:  # another filesystem
            shutil.copy2(path, dst / path.name)


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
    if digest.hexdigest() != spec.source.sha256:
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

    ri = spec.source.random_init
    # Each refusal token as training text too, so BPE learns it as one token ("As" is in no prompt).
    tok = build_tokenizer(ri.special_tokens, ri.bos, ri.eos, ri.pad, vocab_size=ri.vocab_size,
                          extra_text=[spec.template.text] + [t for t in spec.refusal_tokens for _ in range(64)])
    arch = getattr(transformers, ri.architecture, None)
    if arch is None:
        raise ConfigError(spec.file, "source.random_init.architecture", f"transformers has no {ri.architecture}")
    cfg = arch.config_class(**ri.config, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(ri.seed)
    model = arch(cfg)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def build_tokenizer(special_tokens, bos, eos, pad, vocab_size: int, extra_text=()):
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
    """The model YAML's dtype (the papers' models name theirs); `auto`: bfloat16 on a GPU that has it, else
    float16, float32 on the CPU. A dtype the device cannot run is one ConfigError naming the YAML."""
    if spec.dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    dtype = getattr(torch, spec.dtype)
    problem = dtype_problem(dtype, device)
    if problem:
        raise ConfigError(spec.file, "dtype", problem)
    return dtype


def native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def dtype_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `device` cannot run `dtype`, or None. Pre-Ampere GPUs (compute capability < 8, e.g. V100, T4)
    have no bfloat16 arithmetic; torch would emulate it slowly or fail in kernels, so it is refused."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not native_bf16(device):
        name = torch.cuda.get_device_name(device)
        return f"bfloat16, but this GPU ({name}) has no native bfloat16; set float16 or float32"
    return None


def load(spec: ModelSpec, prepared_dir: str | Path, device: str = "auto", tokenizer=None):
    """Load (hf_model, tokenizer) from a prepared directory, eval mode, on the device.

    `tokenizer`: one already loaded (to check the inputs before the weights), reused.
    """
    from transformers import AutoModelForCausalLM

    tok = tokenizer if tokenizer is not None else load_tokenizer(spec, prepared_dir)
    where = _load_from(spec, Path(prepared_dir))
    dev = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=pick_dtype(spec, dev), **placement_kwargs(spec),
                                                 **_local_kwargs(spec))
    if spec.device_map is None:
        model.to(dev)
    else:  # accelerate has placed every module already
        check_placement(spec, model)
    model.eval()
    return model, tok


def placement_kwargs(spec: ModelSpec) -> dict:
    """from_pretrained's device_map, max_memory and offload_folder from the model YAML (none when unset)."""
    if spec.device_map is None:
        return {}
    kwargs = {"device_map": spec.device_map}
    if spec.max_memory is not None:
        kwargs["max_memory"] = dict(spec.max_memory)  # GPU indices are ints again after params (from_params)
    if spec.offload_folder is not None:
        kwargs["offload_folder"] = str(Path(spec.offload_folder).expanduser())
    return kwargs


def check_placement(spec: ModelSpec, model) -> None:
    """What accelerate may offload but generation cannot start from: transformers' generate puts its
    tensors on the model's first weights' device (the input embedding's), and the pipeline nnsight wraps
    the model in takes the device_map's first entry as its device."""
    first_entry = next(iter(getattr(model, "hf_device_map", {"": None}).values()))
    if model.device.type == "meta" or first_entry == "disk":
        raise ConfigError(spec.file, "device_map", "the input embedding (the model's first weights) and the map's "
                          "first entry must not be offloaded (to disk, or to the CPU beside a GPU): put them on a "
                          "GPU, or on the CPU when the model runs there")


def load_tokenizer(spec: ModelSpec, prepared_dir: str | Path):
    """The prepared model's tokenizer alone (cheap: inputs can be checked before the weights load)."""
    from transformers import AutoTokenizer

    set_offline(spec)
    tok = AutoTokenizer.from_pretrained(_load_from(spec, Path(prepared_dir)), **_local_kwargs(spec))
    set_pad_token(tok, spec)
    tok.padding_side = "left"
    return tok


def set_pad_token(tok, spec: ModelSpec) -> None:
    """Batches are left padded: the YAML's pad_token, else the tokenizer's own pad, else its eos."""
    if spec.pad_token is not None:
        if spec.pad_token not in tok.get_vocab():
            raise ConfigError(spec.file, "pad_token", f"{spec.pad_token!r} is not a token of this tokenizer")
        tok.pad_token = spec.pad_token
    elif tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(spec.file, "pad_token", "the tokenizer defines no pad and no eos token: name one "
                              "(Qwen 1: '<|extra_0|>', as the direction paper does)")
        tok.pad_token = tok.eos_token


def context_length(spec: ModelSpec, prepared_dir: str | Path) -> int | None:
    """The model's maximum sequence length from its config.json, if it says."""
    config_dir = Path(_load_from(spec, Path(prepared_dir)))
    return (model_metadata(spec, config_dir) or {}).get("context")


def _local_kwargs(spec: ModelSpec) -> dict:
    # local_files_only as well as the environment: huggingface_hub reads HF_HUB_OFFLINE only at import.
    return {"trust_remote_code": spec.trust_remote_code, "local_files_only": True}


def _load_from(spec: ModelSpec, prepared_dir: Path) -> str:
    """The local folder recorded by prepare; a hub snapshot must still be there (caches get cleaned)."""
    info = json.loads((prepared_dir / PREPARED).read_text())
    where = info["load_from"]
    if where == ".":
        return str(prepared_dir)
    if spec.source.kind == "hub" and not Path(where).is_dir():
        raise ConfigError(spec.file, "source.hub",
                          f"the prepared snapshot {where} is gone (hub cache cleaned, or prepared by an older "
                          f"version); delete {prepared_dir} and prepare the model again")
    return where


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

    def __init__(self, spec: ModelSpec, prepared_dir: str | Path, device: str = "auto", threads: int = 2,
                 tokenizer=None):
        from nnsight import TransformersModel

        set_threads(threads)
        self.spec = spec
        self.hf, self.tok = load(spec, prepared_dir, device, tokenizer)
        self.rmap = residual_map(self.hf)
        # inputs go where the model reads them: with a device_map, other modules sit elsewhere
        self.device = get_path(self.hf, self.rmap.embed).weight.device
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
