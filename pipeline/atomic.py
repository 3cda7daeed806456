"""Atomic reading and writing of stage outputs, and cleanup after killed jobs.

Every output is written to a hidden temp file beside its target, then renamed
over it, so Snakemake never sees half a file. A job that is stopped mid-write
leaves that temp file behind: `start_job` makes SIGTERM (what SLURM sends at the
time limit) remove it, and sweeps up what SIGKILLed earlier jobs left.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class UnreadableOutput(Exception):
    """An earlier stage's output that cannot be read: one line saying how to rebuild it."""

    def __init__(self, path: str | Path, reason: str):
        reason = " ".join(reason.split())  # Arrow messages may span lines
        super().__init__(f"{path}: unreadable Parquet file ({reason}); delete it, or rerun snakemake with "
                         f"--rerun-incomplete or --forcerun {path}, so it is rebuilt")


class OutputNotWritten(Exception):
    """A stage output that was not written: one line naming the file; neither it nor its temp file is left."""

    kind = "output not written"  # the word `job()` prints before the line


class NonFiniteOutput(OutputNotWritten):
    """NaN or infinity where a stage's output must hold a number (issue 17: no silent wrong result)."""

    kind = "bad output"

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}; nothing written")


class DiskFull(OutputNotWritten, OSError):
    """ENOSPC or EDQUOT while writing an output. Still an OSError, for any caller that handles those."""

    kind = "disk full"

    def __init__(self, path: str | Path, err: OSError):
        where = Path(path).parent
        what = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on device"
        super().__init__(f"{path}: {what} while writing it ({free_space(where)} free on the filesystem of "
                         f"{where}); nothing written: free space and rerun")
        self.errno, self.strerror, self.filename = err.errno, err.strerror, str(path)

    def __str__(self) -> str:  # OSError's own would print "[Errno 28] ..." from the attributes above
        return self.args[0]


FULL = (errno.ENOSPC, errno.EDQUOT)


def free_space(folder: str | Path) -> str:
    """The free space on `folder`'s filesystem, readable ("1.2 GiB"), or "unknown"."""
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} B" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"


# Columns whose NaN a stage writes on purpose, meaning "not defined"; infinity is refused everywhere.
# A write can narrow this (`nan_ok=()`: the summary allows no NaN at all).
NAN_MEANS_UNDEFINED = {
    "refusal_score": "activations of a model without refusal_tokens have no logit refusal score",
    "bypass": "selection: candidates not evaluated (discarded by layer, not in the evaluated set, or forced)",
    "induce": "selection: as bypass",
    "kl": "selection: as bypass",
    "cosmic_refuse": "selection: as bypass",
    "cosmic_comply": "selection: as bypass",
    "cosmic": "selection: as bypass",
    "cosine": "stability: the cosine to a zero direction is not defined",
    "logit_score": "sweep: a zero direction has no unit vector to add",
    "nll": "generations: an empty completion has no token to score",
    "nll_neutral": "generations: as nll",
}


def check_finite(table: pa.Table, path: str | Path, nan_ok=NAN_MEANS_UNDEFINED) -> None:
    """Raise NonFiniteOutput naming `path` and the first column (float, or list of floats) holding NaN
    or infinity; NaN is allowed in the columns of `nan_ok`. Nulls are no values and pass."""
    for name, column in zip(table.column_names, table.columns):
        found = _nonfinite(column)
        if found is None:
            continue
        nans, infs, row = found
        if infs == 0 and name in nan_ok:
            continue
        where = f"first in row {row}"
        if "cell" in table.column_names:  # the grid cell a reader can rerun or drop
            where += f", cell '{table.column('cell')[row].as_py()}'"
        raise NonFiniteOutput(path, f"column '{name}' has {nans + infs} NaN/inf values ({nans} NaN, {infs} inf; "
                                    f"{where})")


BLOCK = 1 << 24  # values looked at per step: bounded memory on a large activations table


def _nonfinite(column: pa.ChunkedArray) -> tuple[int, int, int] | None:
    """(NaN count, infinity count, first row holding either) of a float or float-list column, or None
    when it holds neither (or is not made of floats)."""
    nans = infs = 0
    first, offset = None, 0
    for chunk in column.chunks:
        listed = (pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type)
                  or pa.types.is_fixed_size_list(chunk.type))
        values = pc.list_flatten(chunk) if listed else chunk
        if not pa.types.is_floating(values.type):
            return None
        for start in range(0, len(values), BLOCK):
            part = values.slice(start, BLOCK)
            x = part.to_numpy(zero_copy_only=False)
            is_nan, is_inf = np.isnan(x), np.isinf(x)
            if part.null_count:  # nulls read as NaN; they are no value
                is_nan &= part.is_valid().to_numpy(zero_copy_only=False)
            n_nan, n_inf = int(is_nan.sum()), int(is_inf.sum())
            if not (n_nan or n_inf):
                continue
            nans, infs = nans + n_nan, infs + n_inf
            if first is None:
                k = start + int(np.flatnonzero(is_nan | is_inf)[0])
                # the row of a list's value: computed only here, it is as long as the values
                first = offset + (pc.list_parent_indices(chunk)[k].as_py() if listed else k)
        offset += len(chunk)
    return None if first is None else (nans, infs, first)


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        if err.errno in FULL:  # no inode or block left even for the empty temp file
            raise DiskFull(path, err) from None
        raise
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # first: it frees the space the message then reports
        if isinstance(err, OSError) and err.errno in FULL and not isinstance(err, DiskFull):
            raise DiskFull(path, err) from None
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


def write_parquet(table: pa.Table, path: str | Path, vector_columns: tuple[str, ...] = (),
                  nan_ok=NAN_MEANS_UNDEFINED) -> None:
    """Write atomically with zstd, after `check_finite` (NaN only in the columns of `nan_ok`).

    Vector columns skip dictionary encoding (it inflates floats) and use
    BYTE_STREAM_SPLIT, which must name the leaf column to take effect.
    """
    leaves = [f"{c}.list.element" for c in vector_columns]
    dictionary = [c for c in table.column_names if c not in vector_columns]
    check_finite(table, path, nan_ok)  # before the temp file: a refused output leaves nothing
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


@contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """A fresh temp folder beside `path` that replaces `path` (and what it held) if the block succeeds, and is
    removed if not. Named `.{name}.tmp`, the folder form `remove_stale_temps` sweeps after a SIGKILL."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # a killed earlier attempt's
    try:
        tmp.mkdir(parents=True)
        yield tmp
        # a folder cannot be renamed over a non-empty one: the old one goes first (a reader may then see none,
        # never half of one)
        if path.exists():
            _remove(path)
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)  # first: it frees the space the message then reports
        if isinstance(err, OSError) and err.errno in FULL and not isinstance(err, DiskFull):
            raise DiskFull(path, err) from None
        raise
