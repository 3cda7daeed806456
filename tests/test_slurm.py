"""The tiny experiment through the SLURM profile, on a one-node SLURM brought up here by
scripts/slurm_local.sh (Debian's slurm-wlm and munge; installed by the script when root).

Without root or apt-get the test is skipped and says why; with REFUSAL_REQUIRE_SLURM=1 (CI) it
fails instead."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
PROFILES = ("--profile", str(ROOT / "workflow" / "profiles" / "slurm"),
            "--profile", str(ROOT / "workflow" / "profiles" / "slurm-local"))
REQUIRE_SLURM = "REFUSAL_REQUIRE_SLURM"
# Smaller than `tiny` alone: no sweep and no random direction leave 14 SLURM jobs (one generate and one
# score job per model), about half the tiny DAG's, each paying ~10 s of start-up.
OVERRIDES = "overrides=experiment=tiny experiment.sweep=null experiment.direction.sources=[self]"


def unavailable(reason: str):
    if os.environ.get(REQUIRE_SLURM) == "1":
        pytest.fail(f"SLURM unavailable with {REQUIRE_SLURM}=1: {reason}")
    pytest.skip(f"SLURM unavailable: {reason}")


def snakemake(workdir, *args, env=None, timeout=1200):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(log: str) -> dict[str, int]:
    """The `Job stats` table of a snakemake log: rule -> number of jobs."""
    table = log.split("Job stats:", 1)[1].split("total", 1)[0]
    return {row.split()[0]: int(row.split()[1]) for row in table.splitlines()
            if len(row.split()) == 2 and row.split()[1].isdigit()}


def test_local_profile_dry_run(tmp_path):
    # no SLURM needed: the layered profiles parse, every job asks for the debug partition, one score job
    # per model scores its 7 cells, and no job asks for a GPU (the tiny experiment runs on cpu)
    proc = snakemake(tmp_path, "-n", *PROFILES, "--config", OVERRIDES)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    resources = [line for line in out.splitlines() if line.strip().startswith("resources:")]
    assert len(resources) == 14 + 1  # 14 jobs and `all`
    assert all("slurm_partition=debug" in line for line in resources)
    assert not any(re.search(r"\bgpu=[1-9]", line) for line in resources)
    assert {r: n for r, n in job_counts(out).items() if r.startswith("score")} == \
        {"score_tiny-chat_grid1": 1, "score_tiny-base_grid1": 1}


def test_unavailable_skips_unless_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_SLURM, raising=False)
    with pytest.raises(pytest.skip.Exception, match="SLURM unavailable: no root"):
        unavailable("no root")
    monkeypatch.setenv(REQUIRE_SLURM, "1")
    with pytest.raises(pytest.fail.Exception, match="REFUSAL_REQUIRE_SLURM=1: no root"):
        unavailable("no root")


@pytest.fixture()
def slurm():
    """A running one-node cluster (its folder); brought down afterwards, also when the test fails."""
    # short: munged's socket lives in here, and a socket path must fit in 108 bytes
    folder = Path(tempfile.mkdtemp(prefix="slurm-"))
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", "--dir", str(folder)],
                            capture_output=True, text=True, timeout=600)
        if up.returncode == 3:  # the script's "cannot install or run SLURM here"
            unavailable(up.stderr.strip().splitlines()[-1])
        assert up.returncode == 0, up.stderr[-3000:]
        yield folder
    finally:
        down = subprocess.run(["bash", str(SCRIPT), "down", "--dir", str(folder)],
                              capture_output=True, text=True, timeout=120)
        status = subprocess.run(["bash", str(SCRIPT), "status", "--dir", str(folder)],
                                capture_output=True, text=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert status.returncode == 1 and status.stdout.count(": stopped") == 3, status.stdout
    assert not (Path("/etc/slurm/slurm.conf").is_symlink()
                and os.readlink("/etc/slurm/slurm.conf") == str(folder / "slurm.conf"))


@pytest.mark.slow
def test_tiny_experiment_through_slurm(slurm, tmp_path):
    env = {**os.environ, "SLURM_CONF": str(slurm / "slurm.conf")}
    plan = snakemake(tmp_path, "-n", *PROFILES, "--config", OVERRIDES, env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    counts = job_counts(plan.stdout + plan.stderr)
    # every rule's jobs go to SLURM, one score job per model; `all` (no action) stays here
    expected = sum(n for rule, n in counts.items() if rule != "all")
    assert sum(n for rule, n in counts.items() if rule.startswith("score_")) == 2 and expected == 14, counts

    proc = snakemake(tmp_path, *PROFILES, "--config", OVERRIDES, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # every job went through sbatch: the plugin names each SLURM job id and its log
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.", log)
    assert len(submitted) == expected, log[-4000:]
    for jobid, path in submitted:
        assert Path(path).name == f"{jobid}.log" and Path(path).is_file(), path
    # ... and SLURM ran them: squeue still lists finished jobs (MinJobAge), named by the run's id
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    seen = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%P"],
                          capture_output=True, text=True, env=env, check=True).stdout
    jobs = {row.split("|")[0]: row.split("|")[1:] for row in seen.splitlines()}
    for jobid, _ in submitted:
        assert jobs[jobid] == [run_id, "COMPLETED", "debug"], (jobid, jobs.get(jobid))
    ctld_log = (slurm / "log" / "slurmctld.log").read_text()
    for jobid, _ in submitted:  # slurmctld allocated the debug node and saw the batch script exit 0
        # the main scheduler logs "Allocate", the backfill scheduler "_start_job" (either may start a job)
        started = (rf"sched: Allocate JobId={jobid} NodeList=\S+ #CPUs=\d+ Partition=debug"
                   rf"|sched/backfill: _start_job: Started JobId={jobid} in debug on \S+")
        assert re.search(started, ctld_log), jobid
        assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in ctld_log, jobid

    # every output exists: nothing left to do (by modification times: code edited meanwhile would
    # change params and rerun jobs), and the summary covers every cell
    again = snakemake(tmp_path, "-n", "--rerun-triggers", "mtime", *PROFILES, "--config", OVERRIDES, env=env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
    out = tmp_path / "results" / "tiny"
    for name in ("prompts.parquet", "summary.parquet", "summary.csv", "summary.md", "report.md",
                 "charts/tiny-chat.png", "charts/tiny-base.png", "activations/tiny-chat.parquet",
                 "directions/tiny-base/selected.parquet"):
        assert (out / name).is_file(), name
    assert len(list((out / "scores").rglob("*.parquet"))) == 2 * 7
    summary = pl.read_parquet(out / "summary.parquet")
    # 7 cells a model (baseline; own and paired direction x ablation, orthogonalization, +2) x 2 labels
    assert summary.height == 2 * 7 * 2 and set(summary["source"]) == {"none", "self", "tiny-chat", "tiny-base"}
    assert summary["n"].unique().to_list() == [4]
