"""Keep the Hugging Face libraries quiet: no telemetry ever, no network unless a job must fetch.

The libraries read these variables when they are imported, so a job sets them
before importing anything that pulls them in (`pipeline.job` does it on import).
"""

from __future__ import annotations

import os
from pathlib import Path

TELEMETRY_OFF = {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def disable_telemetry() -> None:
    os.environ.update(TELEMETRY_OFF)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def go_offline() -> None:
    disable_telemetry()
    os.environ.update(OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it once, at import)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(os.path.expanduser(env[var])))
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(env["HF_HOME"]))) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
