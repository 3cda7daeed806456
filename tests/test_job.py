"""What every job does around its stage: telemetry off, offline, log, clean temps, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_telemetry_is_off_before_the_hub_libraries_load():
    code = ("import os; os.environ.pop('HF_HUB_DISABLE_TELEMETRY', None)\n"
            "from pipeline.job import job\n"
            "import datasets, huggingface_hub.constants as c\n"
            "print(c.HF_HUB_DISABLE_TELEMETRY)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DO_NOT_TRACK"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stderr[-2000:]


def fake_job(tmp_path, **params):
    return SimpleNamespace(output=[str(tmp_path / "out" / "x.parquet")], log=[str(tmp_path / "logs" / "x.log")],
                           params=SimpleNamespace(**params))


def test_a_job_runs_offline_logs_stderr_and_clears_stale_temps(tmp_path, monkeypatch):
    from pipeline.job import job

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".x.parquet.k2j3h4.tmp"
    stale.write_text("left by a killed attempt")
    smk = fake_job(tmp_path, value=3)
    with job(smk) as p:
        assert p.value == 3 and os.environ["HF_HUB_OFFLINE"] == "1"
        print("progress bar", file=sys.stderr)
    assert not stale.exists()
    assert "progress bar" in (tmp_path / "logs" / "x.log").read_text()


def test_a_damaged_input_is_one_line_saying_how_to_rebuild_it(tmp_path, capsys):
    from pipeline.job import job
    from pipeline.schemas import read_parquet

    broken = tmp_path / "prompts.parquet"
    broken.write_bytes(b"PAR1 truncated by a full disk")
    with pytest.raises(SystemExit):
        with job(fake_job(tmp_path)):
            read_parquet(broken)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(broken) in err[0] and "--forcerun" in err[0], err


def test_bad_input_inside_a_job_is_one_line(tmp_path, capsys):
    from pipeline.errors import ConfigError
    from pipeline.job import job

    with pytest.raises(SystemExit) as stop:
        with job(fake_job(tmp_path)):
            raise ConfigError("conf/model/m.yaml", "refusal_tokens[0]", "'Sure' is 2 tokens")
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["refusal-directions: config error: conf/model/m.yaml: key 'refusal_tokens[0]': 'Sure' is 2 tokens"]
