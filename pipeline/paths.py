"""Where the project and the package's own data live, and how a configured data path resolves."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_data_path(path: str) -> Path:
    """`pkg:` paths point into the package's own data folder; others are relative to the project."""
    if path.startswith("pkg:"):
        return Path(__file__).resolve().parent / "data" / path[4:]
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p
