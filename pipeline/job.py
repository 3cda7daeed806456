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

from .atomic import FULL, OutputNotWritten, UnreadableOutput, free_space, start_job  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .registry import load_plugins  # noqa: E402


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
            sys.stderr = stack.enter_context(_log_file(log))
        stack.enter_context(_stage_logging(sys.stderr))
        try:
            # the experiment's own methods, registered before the stage looks one up by name
            load_plugins(getattr(smk.params, "plugins", None) or ())
            yield smk.params
        except (ConfigError, UnreadableOutput, OutputNotWritten) as err:
            kind = ("config error" if isinstance(err, ConfigError) else
                    err.kind if isinstance(err, OutputNotWritten) else "damaged input")
            _say(f"refusal-directions: {kind}: {err}", terminal)
            raise SystemExit(1) from None
        except OSError as err:
            if err.errno not in FULL:
                raise
            # a full disk met outside an output's write (the log, a model folder): one line too
            folder = Path(err.filename or (outputs[0] if outputs else ".")).parent
            what = f" writing {err.filename}" if err.filename else ""
            _say(f"refusal-directions: disk full: {err.strerror}{what} ({free_space(folder)} free on the "
                 f"filesystem of {folder}); free space and rerun", terminal)
            raise SystemExit(1) from None
        finally:
            sys.stderr = terminal


def _say(line: str, terminal) -> None:
    """The line on the terminal, then in the log; a log on a full disk may refuse it."""
    for stream in dict.fromkeys([terminal, sys.stderr]):
        try:
            print(line, file=stream)
        except OSError:
            pass


@contextlib.contextmanager
def _log_file(path: Path):
    """The rule's log, line-buffered; closing it on a full disk must not turn one line into a traceback."""
    stream = open(path, "a", buffering=1)
    try:
        yield stream
    finally:
        try:
            stream.close()
        except OSError:
            pass  # the line that did not fit is on the terminal


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
