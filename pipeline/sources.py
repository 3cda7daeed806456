"""Cheap checks that a model's source exists, without importing torch.

Run while the config is validated, so a missing GGUF part or local path is
reported in one line before any job starts (and light jobs stay light).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .config import ModelSpec
from .errors import ConfigError


def gguf_part_paths(spec: ModelSpec) -> list[Path]:
    """Each part is 'package/relative/path' inside an installed Python package."""
    paths = []
    for i, part in enumerate(spec.source["gguf_parts"]):
        package, _, rel = str(part).partition("/")
        try:
            base = Path(str(resources.files(package)))
        except ModuleNotFoundError:
            raise ConfigError(spec.file, f"source.gguf_parts[{i}]",
                              f"package '{package}' is not installed (pip install the project)") from None
        path = base / rel
        if not path.exists():
            raise ConfigError(spec.file, f"source.gguf_parts[{i}]", f"file not found: {path}")
        paths.append(path)
    return paths


def check_source(spec: ModelSpec) -> None:
    """Cheap existence checks, run when the config is validated."""
    kind = spec.source_kind
    if kind == "gguf_parts":
        gguf_part_paths(spec)
    elif kind == "path":
        p = Path(os.path.expanduser(spec.source["path"]))
        if not p.exists():
            raise ConfigError(spec.file, "source.path", f"not found: {p}")
