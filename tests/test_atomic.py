"""Atomic writes: no temp file outlives a killed job, modes follow the umask, corrupt reads say what to do."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.atomic import UnreadableOutput, read_parquet, remove_stale_temps, write_bytes, write_parquet, write_text
from pipeline.schemas import vectors_column

ROOT = Path(__file__).resolve().parent.parent

# 64Ki x 1024 random float32 (256 MB): a write that takes about a second, long enough to interrupt.
SLOW_WRITER = """
import sys
import numpy as np
import pyarrow as pa
from pipeline.atomic import install_sigterm_cleanup, write_parquet
from pipeline.schemas import vectors_column

install_sigterm_cleanup()
matrix = np.random.default_rng(0).standard_normal((65536, 1024), dtype=np.float32)
write_parquet(pa.table({"act": vectors_column(matrix, pa.float32())}), sys.argv[1], vector_columns=("act",))
"""


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def wait_for_temp(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not temps(folder):
        assert proc.poll() is None, f"writer exited early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "writer never started its temp file"
        time.sleep(0.005)


def test_sigterm_mid_write_leaves_nothing(tmp_path):
    target = tmp_path / "acts.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_temp(tmp_path, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert not target.exists()
    assert temps(tmp_path) == []


def test_remove_stale_temps_keeps_unrelated_files(tmp_path):
    stale_file = tmp_path / ".x.parquet.abc123.tmp"
    stale_dir = tmp_path / ".model.tmp"
    keep = [tmp_path / "x.parquet", tmp_path / ".x.parquet.csv.abc123.tmp",  # the latter: output x.parquet.csv's
            tmp_path / ".other.parquet.abc123.tmp", tmp_path / "notes.tmp", tmp_path / "model" / "config.json"]
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"weights")
    for path in [stale_file, *keep]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"data")

    remove_stale_temps([tmp_path / "x.parquet", tmp_path / "model", tmp_path / "absent" / "y.parquet"])

    assert not stale_file.exists() and not stale_dir.exists()
    assert all(path.exists() for path in keep)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_parquet(pa.table({"a": [1, 2]}), tmp_path / "t.parquet")
        write_text("text", tmp_path / "t.md")
        write_bytes(b"png", tmp_path / "t.png")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == \
        {"t.parquet": mode, "t.md": mode, "t.png": mode}


def test_vector_columns_keep_their_encoding(tmp_path):
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_parquet(pa.table({"model": ["m"] * 3, "act": vectors_column(matrix, pa.float32())}),
                  tmp_path / "v.parquet", vector_columns=("act",))
    group = pq.ParquetFile(tmp_path / "v.parquet").metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert "BYTE_STREAM_SPLIT" in columns["act.list.element"].encodings
    assert "RLE_DICTIONARY" in columns["model"].encodings
    assert {c.compression for c in columns.values()} == {"ZSTD"}


@pytest.mark.parametrize("content", [b"not parquet at all", "truncated"])
def test_corrupt_parquet_read_is_one_line(tmp_path, content):
    path = tmp_path / "broken.parquet"
    if content == "truncated":
        write_parquet(pa.table({"a": list(range(1000))}), path)
        content = path.read_bytes()[:-100]
    path.write_bytes(content)
    with pytest.raises(UnreadableOutput) as info:
        read_parquet(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and "delete it" in message and "--forcerun" in message
