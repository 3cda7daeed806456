"""What every Snakemake job does around its stage: offline hubs, a log, clean temps, one-line errors.

Each workflow script is `with job(snakemake) as p: <stage>.run(...)`: the stage gets
the rule's params (the typed specs, rebuilt with `specs.from_params`), its stderr
and progress bars go to the rule's log, leftovers of a killed earlier attempt are
removed, SIGTERM (a SLURM time limit) still cleans up the temp files, and bad
input found inside the job is one line on the terminal, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from .offline import disable_telemetry, go_offline

disable_telemetry()  # before the stage's imports pull in the hub libraries

from .atomic import UnreadableOutput, start_job  # noqa: E402
from .errors import ConfigError  # noqa: E402


@contextlib.contextmanager
def job(smk, online: bool = False):
    """Run a stage inside a Snakemake job; yields the rule's params.

    `online`: the job must reach the hub (a hub dataset, or a hub model to prepare);
    every other job runs with the hub libraries offline.
    """
    if not online:
        go_offline()
    outputs = [str(o) for o in smk.output]
    start_job(outputs)
    terminal = sys.stderr
    log = Path(smk.log[0]) if len(smk.log) else None
    with contextlib.ExitStack() as stack:
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            sys.stderr = stack.enter_context(open(log, "a", buffering=1))
        stack.enter_context(_stage_logging(sys.stderr))
        try:
            yield smk.params
        except (ConfigError, UnreadableOutput) as err:
            kind = "config error" if isinstance(err, ConfigError) else "damaged input"
            for stream in {terminal, sys.stderr}:
                print(f"refusal-directions: {kind}: {err}", file=stream)
            raise SystemExit(1) from None
        finally:
            sys.stderr = terminal


@contextlib.contextmanager
def _stage_logging(stream):
    """The stages' `logging` lines (what a stage counted, dropped or retried) go to the rule's log."""
    logger = logging.getLogger("pipeline")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
