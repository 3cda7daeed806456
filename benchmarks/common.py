"""What the benchmarks share: the model to time (prepared once, as the pipeline does) and the prompts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipeline.config import DEFAULT_CONF_DIR, PROJECT_ROOT, load_model, resolve_data_path
from pipeline.models import PREPARED, LoadedModel, prepare


def load_for_benchmark(name: str, device: str, dtype: str | None = None) -> LoadedModel:
    """The model YAML `name`, prepared under results/models (a random tiny model in a temp folder),
    loaded on `device`; `dtype` overrides the YAML's (e.g. bfloat16)."""
    spec = load_model(name, DEFAULT_CONF_DIR, "benchmark", "--model")
    if dtype:
        spec = spec.model_copy(update={"dtype": dtype})
    prepared = PROJECT_ROOT / "results" / "models" / name
    if spec.source.kind == "random_init":
        prepared = Path(tempfile.mkdtemp()) / name
    if not (prepared / PREPARED).exists():
        prepare(spec, prepared)
    return LoadedModel(spec, prepared, device, threads=torch.get_num_threads())


def harmless_instructions(n: int) -> list[str]:
    """The first n of the project's own harmless prompts."""
    lines = resolve_data_path("pkg:harmless.jsonl").read_text().splitlines()
    return [json.loads(line)["instruction"] for line in lines[:n]]
