"""Issue 17, no silent wrong result: NaN or infinity in a stage's output, and a full disk, stop the job
with one line naming the file, and leave neither the output nor its temp file."""

import errno
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import aggregate, atomic, capability, directions, generate, prompts, score, select, sweep
from pipeline.interventions import make_edit
from pipeline.atomic import DiskFull, NonFiniteOutput, write_bytes, write_parquet
from pipeline.config import Capability, ScorerSpec, Selection, load_experiment
from pipeline.schemas import GENERATIONS, activations_schema, direction_schema, vectors_column, CANDIDATE_EXTRA

ROOT = Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_refused(err, path: Path, column: str) -> None:
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: column '{column}' has "), text
    assert text.endswith("; nothing written"), text
    assert not path.exists()
    assert not [n for n in leftovers(path.parent) if n.endswith(".tmp")]


# ------------------------------------------------------------------ the central check in write_parquet


def vectors(values, dtype=pa.float32(), width=2):
    return vectors_column(np.asarray(values, dtype=dtype.to_pandas_dtype()).reshape(-1, width), dtype)


@pytest.mark.parametrize("column, values, nan_ok", [
    ("value", pa.array([1.0, NAN, 2.0]), ()),
    ("value", pa.array([1.0, -INF, 2.0], pa.float32()), ()),
    ("act", vectors([1, 2, 3, INF, 5, 6], pa.float16()), ()),  # a float16 activation that overflowed
    ("direction", vectors([1, 2, NAN, 4, 5, 6]), ()),
    ("nll", pa.array([1.0, INF, 2.0]), ("nll",)),  # a column that may hold NaN never holds infinity
    ("nll", pa.array([1.0, NAN, 2.0]), ()),  # nor NaN when the write allows none (the summary)
])
def test_a_non_finite_value_is_refused_naming_file_column_and_row(tmp_path, column, values, nan_ok):
    path = tmp_path / "out" / "x.parquet"
    table = pa.table({"cell": ["a", "b", "c"], column: values})
    with pytest.raises(NonFiniteOutput) as err:
        write_parquet(table, path, vector_columns=(column,) if column in ("act", "direction") else (),
                      nan_ok=nan_ok)
    assert_refused(err, path, column)
    assert "first in row 1, cell 'b'" in str(err.value)


def test_nulls_and_the_documented_nans_pass(tmp_path):
    table = pa.table({"nll": [1.0, NAN, None], "refusal_score": pa.array([NAN] * 3, pa.float32()),
                      "act": vectors([1, 2, 3, 4, 5, 6]), "n": [1, 2, 3], "name": ["a", None, "c"]})
    write_parquet(table, tmp_path / "ok.parquet", vector_columns=("act",))
    assert pq.read_table(tmp_path / "ok.parquet").num_rows == 3


def test_a_refused_output_inside_a_job_is_one_line(tmp_path, capsys):
    from pipeline.job import job

    out = tmp_path / "out" / "x.parquet"
    smk = SimpleNamespace(output=[str(out)], log=[str(tmp_path / "x.log")], params=SimpleNamespace())
    with pytest.raises(SystemExit) as stop:
        with job(smk):
            write_parquet(pa.table({"cell": ["add_1e300"], "nll": [INF]}), out)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"refusal-directions: bad output: {out}: column 'nll' has 1 NaN/inf values (0 NaN, 1 inf; "
                   "first in row 0, cell 'add_1e300'); nothing written"], err
    assert not out.exists() and (tmp_path / "x.log").read_text().strip() == err[0]


# ------------------------------------------------------------------ each stage's write path


def activation_rows(act: np.ndarray, labels: list[str]) -> pa.Table:
    """One layer, one position; written without the check, as a file from elsewhere would be."""
    n, d = act.shape
    return pa.table({"model": ["m"] * n, "template": ["t"] * n, "prompt_id": [f"p{i}" for i in range(n)],
                     "label": labels, "layer": pa.array([0] * n, pa.int16()),
                     "position": pa.array([-1] * n, pa.int16()),
                     "refusal_score": pa.array([0.0] * n, pa.float32()), "act": vectors_column(act, pa.float32())},
                    schema=activations_schema(d, "float32"))


def test_directions_stage(tmp_path):
    act = np.ones((4, 4), np.float32)
    act[0, 2] = INF  # a harmful activation that overflowed: its mean difference is inf
    pq.write_table(activation_rows(act, ["harmful", "harmful", "harmless", "harmless"]), tmp_path / "acts.parquet")
    out = tmp_path / "candidates.parquet"
    with pytest.raises(NonFiniteOutput) as err:
        directions.run("m", str(tmp_path / "acts.parquet"), str(out), method="mean_diff", filter_prompts=False,
                       exp_file="e.yaml")
    assert_refused(err, out, "norm")


def test_select_stage_forced(tmp_path):
    matrix = np.array([[1.0, NAN, 0.0, 0.0]], np.float32)
    table = pa.table({"model": ["m"], "method": ["mean_diff"], "n_harmful": pa.array([2], pa.int32()), "n_harmless": pa.array([2], pa.int32()),
                      "layer": pa.array([0], pa.int16()), "position": pa.array([-1], pa.int16()), "norm": [NAN],
                      "direction": vectors_column(matrix, pa.float32())}, schema=direction_schema(4, CANDIDATE_EXTRA))
    pq.write_table(table, tmp_path / "candidates.parquet")
    outs = [tmp_path / n for n in ("selection.parquet", "selected.parquet", "selection.png")]
    with pytest.raises(NonFiniteOutput) as err:
        select.run(SimpleNamespace(name="m", file="m.yaml"), "", "", str(tmp_path / "candidates.parquet"),
                   *map(str, outs), forced=(0, -1), rules=Selection(), filter_prompts=False, random_seed=0,
                   device="cpu", threads=1, exp_file="e")
    assert_refused(err, outs[0], "norm")  # the forced row's NaN bypass/induce/kl ("not evaluated") would pass
    assert not any(p.exists() for p in outs)


def test_sweep_stage(tmp_path, monkeypatch):
    rows = pl.DataFrame({"kind": ["baseline", "addition"], "extraction_layer": [None, 0],
                         "extraction_position": [None, -1], "addition_layer": [None, 0], "offset": [None, 0],
                         "coefficient": [None, 2.0], "normalized": [None, False], "label": ["harmless"] * 2,
                         "logit_score": [1.0, INF], "n": [4, 4]}, schema=sweep.ROW_SCHEMA)
    monkeypatch.setattr(sweep, "LoadedModel", lambda *a, **k: None)
    monkeypatch.setattr(sweep, "val_prompts", lambda path: (["h"], ["s"]))
    monkeypatch.setattr(sweep, "score_cells", lambda *a, **k: rows)
    monkeypatch.setattr(sweep, "pick_cells", lambda scores, spec: pl.DataFrame())
    table = pa.table({"model": ["m"], "method": ["mean_diff"], "n_harmful": pa.array([2], pa.int32()), "n_harmless": pa.array([2], pa.int32()),
                      "layer": pa.array([0], pa.int16()), "position": pa.array([-1], pa.int16()), "norm": [1.0],
                      "direction": vectors_column(np.eye(1, 4, dtype=np.float32), pa.float32())},
                     schema=direction_schema(4, CANDIDATE_EXTRA))
    pq.write_table(table, tmp_path / "candidates.parquet")
    spec = SimpleNamespace(position=-1, extraction_layers=None, cells=())
    out = tmp_path / "sweep.parquet"
    with pytest.raises(NonFiniteOutput) as err:
        sweep.run(SimpleNamespace(name="m"), "", "", str(tmp_path / "candidates.parquet"), "", str(out),
                  str(tmp_path / "picks.parquet"), str(tmp_path / "sweep.png"), sweep=spec, normalize=False,
                  ablation_layers=None, device="cpu", threads=1, exp_file="e")
    assert_refused(err, out, "logit_score")  # NaN marks a zero direction's score; infinity nothing


def generation_rows(**changes) -> pa.Table:
    row = {"model": "m", "template": "t", "source": "self", "cell": "addition_2", "direction_model": "m",
           "extraction_layer": 1, "extraction_position": -1, "intervention": "addition", "addition_layer": 1,
           "coefficient": 2.0, "normalized": False, "ablation_layers": None, "prompt_id": "p0", "label": "harmless",
           "category": "c", "prompt": "p", "completion": "I cannot", "repetition": 0.0, "nll": 2.0,
           "nll_neutral": 2.0}
    return pa.Table.from_pylist([{**row, **changes}], schema=GENERATIONS)


def test_score_stage(tmp_path):
    scorer = ScorerSpec(name="s", kind="prefix", phrases=["I cannot"])
    pq.write_table(generation_rows(completion="", nll=NAN, nll_neutral=NAN), tmp_path / "empty.parquet")
    score.run(scorer, str(tmp_path / "empty.parquet"), str(tmp_path / "ok.parquet"))  # an empty completion's NaN
    assert (tmp_path / "ok.parquet").exists()
    pq.write_table(generation_rows(repetition=NAN), tmp_path / "gen.parquet")
    out = tmp_path / "scores.parquet"
    with pytest.raises(NonFiniteOutput) as err:
        score.run(scorer, str(tmp_path / "gen.parquet"), str(out))
    assert_refused(err, out, "repetition")


def test_capability_write_path(tmp_path):
    out = tmp_path / "capability.parquet"
    table = capability.to_table("m", "self", "addition_1e300", "addition", 1e300,
                                {"ce_own": (NAN, 3), "ce_reference": (2.0, 3), "first_token_kl": (NAN, 3)})
    with pytest.raises(NonFiniteOutput) as err:
        write_parquet(table, out)
    assert_refused(err, out, "value")
    assert "2 NaN/inf values" in str(err.value) and "cell 'addition_1e300'" in str(err.value)


def test_no_nan_reaches_a_summary(tmp_path):
    scorer = ScorerSpec(name="s", kind="prefix", phrases=["I"])
    rows = [generation_rows(cell=c, intervention=k, prompt_id=p, nll=NAN if c == "baseline" else 2.0)
            for c, k in (("baseline", "baseline"), ("addition_2", "addition")) for p in ("p0", "p1")]
    scores = pl.from_arrow(score.score_table(pa.concat_tables(rows), scorer))
    scores.write_parquet(tmp_path / "scores.parquet")
    cap = pl.DataFrame({"model": "m", "source": "self", "cell": "addition_2", "intervention": "addition",
                        "coefficient": 2.0, "metric": ["ce_own", "first_token_kl"], "value": [2.0, NAN], "n": 3},
                       schema_overrides={"n": pl.Int32})
    cap.write_parquet(tmp_path / "cap.parquet")  # written before the check existed, say
    out = tmp_path / "results"
    with pytest.raises(NonFiniteOutput) as err:
        aggregate.run("t", [str(tmp_path / "scores.parquet")], str(out), {"m": str(out / "charts" / "m.png")},
                      capability_paths=[str(tmp_path / "cap.parquet")])
    assert_refused(err, out / "summary.parquet", "first_token_kl")
    assert leftovers(out) == []  # nor the csv, the markdown or the report
    # the baseline's NaN nll (an empty completion) is no number to average, not a NaN in the summary
    aggregate.run("t", [str(tmp_path / "scores.parquet")], str(out), {"m": str(out / "charts" / "m.png")})
    assert pl.read_parquet(out / "summary.parquet")["nll"].is_nan().sum() == 0


def test_generate_stage_with_a_nan_producing_addition(tiny_dirs, tmp_path):
    """Greedy decoding of NaN logits gives empty completions with NaN losses, written as if fine: the
    job stops before generating, naming the cell."""
    exp = load_experiment(["experiment=tiny"])
    write_parquet(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file), tmp_path / "prompts.parquet")
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan = generate.CellPlan(source="self", cell="addition_1e+300",
                             edit=make_edit("addition", direction=direction, layer=1, coefficient=1e300),
                             direction_model="tiny-chat", extraction_layer=1, extraction_position=-1)
    out, cap = tmp_path / "gen" / "addition_1e+300.parquet", tmp_path / "cap" / "addition_1e+300.parquet"
    with pytest.raises(NonFiniteOutput) as err:
        generate.run_cells(exp.models["tiny-chat"], str(tiny_dirs["tiny-chat"]), str(tmp_path / "prompts.parquet"),
                           [(plan, str(out), str(cap))], max_new_tokens=3, batch_size=4, device="cpu", threads=1,
                           exp_file=exp.file, capability_cfg=Capability(n=2), nll_prompts=1)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{out}: cell 'addition_1e+300': next-token logits"), text
    assert "coefficient 1e+300 x the raw direction at layer 1" in text
    assert not out.exists() and not cap.exists()


# ------------------------------------------------------------------ a full disk


def full_disk(code=errno.ENOSPC):
    def write(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")  # what a real write leaves before the disk fills
        raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")
    return write


@pytest.mark.parametrize("code, what", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_is_one_line_with_the_free_space(tmp_path, monkeypatch, code, what):
    monkeypatch.setattr(atomic.pq, "write_table", full_disk(code))
    path = tmp_path / "out" / "acts.parquet"
    with pytest.raises(DiskFull) as err:
        write_parquet(pa.table({"a": [1.0]}), path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: {what} while writing it ("), text
    assert f"free on the filesystem of {path.parent}); nothing written" in text
    assert err.value.errno == code and isinstance(err.value, OSError)
    assert leftovers(path.parent) == []


def test_a_full_disk_creating_the_temp_file(tmp_path, monkeypatch):
    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", no_inode)
    with pytest.raises(DiskFull, match="no space left on device while writing it"):
        write_bytes(b"png", tmp_path / "chart.png")
    assert leftovers(tmp_path) == []


def test_a_full_disk_inside_a_job_is_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.job import job

    monkeypatch.setattr(atomic.pq, "write_table", full_disk())
    out = tmp_path / "out" / "x.parquet"
    smk = SimpleNamespace(output=[str(out)], log=[str(tmp_path / "x.log")], params=SimpleNamespace())
    with pytest.raises(SystemExit) as stop:
        with job(smk):
            write_parquet(pa.table({"a": [1.0]}), out)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"refusal-directions: disk full: {out}: no space left"), err
    assert leftovers(out.parent) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_log_on_a_full_disk_still_gives_one_line(tmp_path, capsys):
    """/dev/full refuses every write with ENOSPC: the stage's own log lines, then the error line."""
    from pipeline.job import job

    smk = SimpleNamespace(output=[str(tmp_path / "x.parquet")], log=["/dev/full"], params=SimpleNamespace())
    with pytest.raises(SystemExit) as stop:
        with job(smk):
            print("progress", file=sys.stderr)  # the log refuses it: ENOSPC in the stage
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("refusal-directions: disk full: No space left on device"), err


# ------------------------------------------------------------------ through the DAG


@pytest.mark.slow
def test_snakemake_stops_a_nan_producing_cell_with_one_line(tmp_path, conf_copy):
    """A coefficient within the config bound (1e6 x the unit direction) that still overflows a float16
    model: the generate job stops before writing any of its cells, with one line."""
    (conf_copy / "intervention" / "small.yaml").write_text(
        "ablation: false\northogonalization: false\naddition: {normalize: true, coefficients: [1.0e+6]}\n")
    chat = conf_copy / "model" / "tiny-chat.yaml"
    chat.write_text(chat.read_text().replace("add_bos: false", "add_bos: false\ndtype: float16"))
    overrides = ("experiment=tiny experiment.models=[tiny-chat] experiment.pairs=[] ~experiment.sweep "
                 "experiment.direction.sources=[self]")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "2",
                           "-d", str(tmp_path / "work"), "--config", f"overrides={overrides}",
                           f"conf_dir={conf_copy}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("refusal-directions:")]
    out = "results/tiny/generations/tiny-chat/self/addition_1e+06.parquet"
    assert lines == [f"refusal-directions: bad output: {out}: cell 'addition_1e+06': next-token logits under "
                     "addition are NaN/inf on 8 of 8 prompts (coefficient 1e+06 x the unit direction at layer 1 "
                     "is too large for float16: lower it); nothing written"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    results = tmp_path / "work" / "results" / "tiny"
    assert not (results / "generations").exists() or not any((results / "generations").rglob("*.parquet"))
    assert not (results / "summary.parquet").exists()
