"""Atomic reading and writing of stage outputs, and cleanup after killed jobs.

Every output is written to a hidden temp file beside its target, then renamed
over it, so Snakemake never sees half a file. A job that is stopped mid-write
leaves that temp file behind: `start_job` makes SIGTERM (what SLURM sends at the
time limit) remove it, and sweeps up what SIGKILLed earlier jobs left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class UnreadableOutput(Exception):
    """An earlier stage's output that cannot be read: one line saying how to rebuild it."""

    def __init__(self, path: str | Path, reason: str):
        reason = " ".join(reason.split())  # Arrow messages may span lines
        super().__init__(f"{path}: unreadable Parquet file ({reason}); delete it, or rerun snakemake with "
                         f"--rerun-incomplete or --forcerun {path}, so it is rebuilt")


def start_job(outputs: Iterable[str | Path]) -> None:
    """Call first in a stage's script: temp files never outlive the job."""
    install_sigterm_cleanup()
    remove_stale_temps(outputs)


def install_sigterm_cleanup() -> None:
    """Turn SIGTERM into SystemExit(143), so the temp-file cleanup of the write under way runs.

    Python runs the handler between bytecodes, so a write inside one long Arrow
    call is cut short only once that call returns, still before the rename.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    sys.stderr.write("refusal-directions: terminated by SIGTERM, removing temp files\n")
    raise SystemExit(128 + signum)


def remove_stale_temps(outputs: Iterable[str | Path]) -> None:
    """Delete temp files and folders that killed jobs left for these outputs.

    Files are `.{name}.<random>.tmp` (`mkstemp` below), folders `.{name}.tmp`
    (`models.prepare`). The random part has no dot, so the temp of another
    output whose name extends this one (`summary` vs `summary.csv`) is kept.
    """
    if isinstance(outputs, (str, Path)):  # one path, not its characters
        outputs = [outputs]
    for output in outputs:
        output = Path(output)
        if not output.parent.is_dir():
            continue
        pattern = re.compile(rf"\.{re.escape(output.name)}(\.[a-z0-9_]+)?\.tmp")
        for entry in output.parent.iterdir():
            if pattern.fullmatch(entry.name):
                _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _replacing(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` that becomes `path` if the block succeeds, and is removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0)  # the only portable way to read it; racy only against other threads creating files
    os.umask(old)
    return old


def write_parquet(table: pa.Table, path: str | Path, vector_columns: tuple[str, ...] = ()) -> None:
    """Write atomically with zstd.

    Vector columns skip dictionary encoding (it inflates floats) and use
    BYTE_STREAM_SPLIT, which must name the leaf column to take effect.
    """
    leaves = [f"{c}.list.element" for c in vector_columns]
    dictionary = [c for c in table.column_names if c not in vector_columns]
    with _replacing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=dictionary or False,
                       column_encoding={leaf: "BYTE_STREAM_SPLIT" for leaf in leaves} or None)


def write_text(text: str, path: str | Path) -> None:
    write_bytes(text.encode(), path)


def write_bytes(data: bytes, path: str | Path) -> None:
    with _replacing(path) as tmp:
        tmp.write_bytes(data)


def read_parquet(path: str | Path) -> pa.Table:
    """Read a whole Parquet file; a corrupt one raises `UnreadableOutput`, not an Arrow traceback."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as err:
        raise UnreadableOutput(path, str(err)) from None
