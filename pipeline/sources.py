"""Cheap facts about a model's source, without importing torch or loading weights.

Run while the config is validated, so a missing GGUF part or local path, or a layer
the model does not have, is reported in one line before any job starts (and light
jobs stay light). The metadata (layer count, hidden size, context length) comes
from the prepared model's config.json, a local or cached config.json, the GGUF
header, or the tiny model's config in its YAML.
"""

from __future__ import annotations

import json
import os
import struct
from importlib import resources
from pathlib import Path

from .errors import ConfigError
from .offline import hub_cache_dir
from .specs import ModelSpec


def gguf_part_paths(spec: ModelSpec) -> list[Path]:
    """Each part is 'package/relative/path' inside an installed Python package."""
    paths = []
    for i, part in enumerate(spec.source.gguf_parts):
        package, _, rel = str(part).partition("/")
        try:
            base = Path(str(resources.files(package)))
        except ModuleNotFoundError:
            # name the optional extra that pins the package (pyproject.toml), if one does
            import re
            import tomllib

            hint = "pip install the project: pip install -e ."
            try:
                with (Path(__file__).resolve().parent.parent / "pyproject.toml").open("rb") as f:
                    extras = tomllib.load(f).get("project", {}).get("optional-dependencies", {})
            except (OSError, ValueError):
                extras = {}
            pep503 = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
            for extra, reqs in extras.items():
                if any(pep503(re.match(r"[A-Za-z0-9._-]*", r).group()) == pep503(package) for r in reqs):
                    hint = f"it comes with the optional extra '{extra}': pip install -e '.[{extra}]'"
            raise ConfigError(spec.file, f"source.gguf_parts[{i}]",
                              f"package '{package}' is not installed ({hint})") from None
        path = base / rel
        if not path.is_file():
            raise ConfigError(spec.file, f"source.gguf_parts[{i}]", f"file not found: {path}")
        paths.append(path)
    return paths


def check_source(spec: ModelSpec) -> None:
    """Cheap existence checks, run when the config is validated."""
    kind = spec.source.kind
    if kind == "gguf_parts":
        gguf_part_paths(spec)
    elif kind == "path":
        p = Path(os.path.expanduser(spec.source.path))
        if not p.exists():
            raise ConfigError(spec.file, "source.path", f"not found: {p}")
        if not p.is_dir():
            raise ConfigError(spec.file, "source.path", f"{p} is a file: point it at the model's folder (the one "
                              "with config.json and the weights)")
        config = p / "config.json"
        if not config.is_file():
            raise ConfigError(spec.file, "source.path", f"{p} has no config.json: not a transformers model folder "
                              "(save_pretrained writes one)")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(spec.file, "source.path", f"{config} is not readable JSON ({err})") from None


def model_metadata(spec: ModelSpec, prepared_dir: Path | None = None) -> dict | None:
    """{n_layers, hidden_size, context} where known without weights, else None (e.g. an uncached hub model)."""
    config = _config_json(spec, prepared_dir)
    if config is not None:
        return _from_config(config)
    if spec.source.kind == "gguf_parts":
        return gguf_metadata(gguf_part_paths(spec))
    return None


def _config_json(spec: ModelSpec, prepared_dir: Path | None) -> dict | None:
    candidates = []
    if prepared_dir is not None:
        candidates.append(Path(prepared_dir) / "config.json")
    kind = spec.source.kind
    if kind == "random_init":
        ri = spec.source.random_init
        return {**ri.config, "architectures": [ri.architecture]}
    if kind == "path":
        candidates.append(Path(os.path.expanduser(spec.source.path)) / "config.json")
    if kind == "hub":
        cached = _hub_cached_config(spec)
        if cached:
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
    return None


def _hub_cached_config(spec: ModelSpec) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(spec.source.hub, "config.json", revision=spec.source.revision,
                                   cache_dir=hub_cache_dir())
    return found if isinstance(found, str) else None


def _from_config(cfg: dict) -> dict:
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    return {"n_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers"),
            "hidden_size": cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model"),
            "context": cfg.get("max_position_embeddings") or cfg.get("n_positions")}


def _gguf_scalars() -> dict:
    """struct codes of the GGUF metadata scalar types (the value types as the `gguf` package names them)."""
    from gguf import GGUFValueType as T

    return {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
            T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


class _Stream:
    """Sequential reads across the GGUF's parts, as if they were one file."""

    def __init__(self, paths: list[Path]):
        self.paths, self.file = list(paths), None

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            if self.file is None:
                if not self.paths:
                    raise EOFError("GGUF header ends early")
                self.file = open(self.paths.pop(0), "rb")
            chunk = self.file.read(n - len(out))
            if not chunk:
                self.file.close()
                self.file = None
            out += chunk
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def gguf_metadata(paths: list[Path]) -> dict | None:
    """Layer count, hidden size and context length from a GGUF header (read up to those keys only).

    The parts are read as one stream, so the GGUF is never assembled for this.
    """
    stream = _Stream(paths)
    scalars = _gguf_scalars()
    try:
        if stream.read(4) != b"GGUF":
            return None
        _version, _tensors, n_kv = struct.unpack("<IQQ", stream.read(20))
        found, arch = {}, None
        for _ in range(n_kv):
            key = _gguf_string(stream)
            value = _gguf_value(stream, struct.unpack("<I", stream.read(4))[0], scalars)
            if key == "general.architecture":
                arch = value
            found[key] = value
            if arch and all(f"{arch}.{k}" in found for k in ("block_count", "embedding_length", "context_length")):
                break
        if arch is None:
            return None
        return {"n_layers": found.get(f"{arch}.block_count"), "hidden_size": found.get(f"{arch}.embedding_length"),
                "context": found.get(f"{arch}.context_length")}
    except (EOFError, struct.error, UnicodeDecodeError):
        return None
    finally:
        stream.close()


def _gguf_string(stream: _Stream) -> str:
    (n,) = struct.unpack("<Q", stream.read(8))
    return stream.read(n).decode("utf-8")


def _gguf_value(stream: _Stream, kind: int, scalars: dict):
    from gguf import GGUFValueType

    if kind in scalars:
        code = scalars[kind]
        return struct.unpack("<" + code, stream.read(struct.calcsize(code)))[0]
    if kind == GGUFValueType.STRING:
        return _gguf_string(stream)
    if kind == GGUFValueType.ARRAY:
        item, count = struct.unpack("<IQ", stream.read(12))
        if item in scalars:  # skip fixed-size arrays in one read
            stream.read(struct.calcsize(scalars[item]) * count)
        else:
            for _ in range(count):
                _gguf_value(stream, item, scalars)
        return None
    raise struct.error(f"unknown GGUF value type {kind}")
