"""Bad prompt sets (issue 17): one clear line naming the file and the key, while the DAG is built for a
local file, in the prompts job (before it writes) for a hub set; and no prompt dropped without a count.

The rule, for every format (JSON Lines, a JSON array, CSV, hub): a key of the dataset YAML naming no
column is refused; a blank instruction, and a row `filter_empty` or `where` rules out, is dropped and
counted (log and `pools` metadata); a local file repeating an instruction or an id is refused, naming
both lines; a hub set's repeats are dropped by its pool and counted; a split larger than the usable
prompts is refused, for local files while the DAG is built.

A case is (overrides, edits, file, key), as in tests/test_config_errors.py: `edits` rewrite files of a
private copy of conf/ as (relative path, "ALL" | "BYTES", new content); "{conf}" is that copy's path.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import prompts
from pipeline.config import load_experiment
from pipeline.errors import ConfigError
from tests.test_config_errors import apply, expect_one_line

ROOT = Path(__file__).resolve().parent.parent
TINY = "experiment=tiny"
DS = "dataset/own-harmful.yaml"
EXP = "experiment/tiny.yaml"


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def prompts_file(name: str, data: bytes, yaml: str, fmt: str = ""):
    """Point own-harmful at a file `name` with these bytes and these dataset keys."""
    return [(f"data/{name}", "BYTES", data),
            (DS, "ALL", f"path: {{conf}}/data/{name}\n" + (f"format: {fmt}\n" if fmt else "") + yaml)]


def many(n: int, start: int = 0, **extra) -> list[dict]:
    return [{"instruction": f"Harmful task number {i}.", **extra} for i in range(start, start + n)]


CSV_HEAD = b"instruction,input,cat\n"

CASES = {
    # 1. keys that name no column: local files, every format
    "category_field names no column (JSON Lines)": (
        [], prompts_file("p.jsonl", jsonl(*many(20, category="x")), "category_field: kategory\n"), DS,
        "category_field"),
    "filter_empty names no column (JSON Lines)": (
        [], prompts_file("p.jsonl", jsonl(*many(20, input="")), "filter_empty: inputs\n"), DS, "filter_empty"),
    "field names no column (JSON Lines)": (
        [], prompts_file("p.jsonl", jsonl(*many(20)), "field: prompt\n"), DS, "field"),
    "id_field names no column (JSON Lines)": (
        [], prompts_file("p.jsonl", jsonl(*many(20)), "id_field: id\n"), DS, "id_field"),
    "where names no column (JSON Lines)": (
        [], prompts_file("p.jsonl", jsonl(*many(20)), "where: {kind: standard}\n"), DS, "where.kind"),
    "category_field names no column (CSV)": (
        [], prompts_file("p.csv", CSV_HEAD + b"".join(b"Task %d.,,a\n" % i for i in range(20)),
                         "category_field: category\n", "csv"), DS, "category_field"),
    "filter_empty names no column (CSV)": (
        [], prompts_file("p.csv", CSV_HEAD + b"".join(b"Task %d.,,a\n" % i for i in range(20)),
                         "filter_empty: Input\n", "csv"), DS, "filter_empty"),
    "field names no column (CSV)": (
        [], prompts_file("p.csv", CSV_HEAD + b"".join(b"Task %d.,,a\n" % i for i in range(20)),
                         "field: Behavior\n", "csv"), DS, "field"),
    "category_field names no column (JSON array)": (
        [], prompts_file("p.json", json.dumps(many(20)).encode(), "category_field: category\n"), DS,
        "category_field"),
    # 2. repeats: refused in every local format, naming both lines
    "duplicate prompt (CSV)": (
        [], prompts_file("p.csv", CSV_HEAD + b"Do X.,,a\nDo Y.,,a\ndo  x.,,a\n", "", "csv"), DS, "path"),
    "duplicate prompt (JSON array)": (
        [], prompts_file("p.json", json.dumps([{"instruction": "Do X."}, {"instruction": "DO X."}]).encode(), ""),
        DS, "path"),
    "duplicate id (CSV)": (
        [], prompts_file("p.csv", b"instruction,id\nDo X.,1\nDo Y.,1\n", "id_field: id\n", "csv"), DS, "id_field"),
    "every prompt blank": (
        [], prompts_file("p.jsonl", jsonl({"instruction": " "}, {"instruction": ""}, {"instruction": None}), ""),
        DS, "field"),
    "every row filtered out": (
        [], prompts_file("p.csv", CSV_HEAD + b"Do X.,some input,a\nDo Y.,more,a\n", "filter_empty: input\n", "csv"),
        DS, "filter_empty"),
    "instruction a number": (
        [], prompts_file("p.jsonl", jsonl({"instruction": "Do X."}, {"instruction": 7}), ""), DS, "field"),
    # 3. a JSON array is read, with the same checks as JSON Lines; what is neither is one line
    "JSON array item not an object": (
        [], prompts_file("p.json", b'[{"instruction": "Do X."},\n "Do Y."]\n', ""), DS, "path"),
    "JSON array broken": ([], prompts_file("p.json", b'[{"instruction": "Do X."},\n {"instruction": }]\n', ""),
                          DS, "path"),
    "JSON array not UTF-8": ([], prompts_file("p.json", b'[{"instruction": "\xff"}]', ""), DS, "path"),
    "JSON array field missing in an item": (
        [], prompts_file("p.json", b'[{"instruction": "Do X."}, {"text": "Do Y."}]', ""), DS, "field"),
    "one JSON object, not an array": (
        [], prompts_file("p.json", b'{\n  "instruction": "Do X."\n}\n', ""), DS, "path"),
    "CSV row with a missing cell": (
        [], prompts_file("p.csv", CSV_HEAD + b"Do X.,,a\nDo Y.,a\n", "", "csv"), DS, "path"),
    "CSV column named twice": ([], prompts_file("p.csv", b"instruction,x,x\nDo X.,1,2\n", "", "csv"), DS, "path"),
    # 4. split sizes counted while the DAG is built, after blanks, filters and exclusions
    "train larger than the set": (["experiment.split.train=500"], [], EXP, "split.train"),
    "val larger than what train leaves": (["experiment.split.val=153"], [], EXP, "split.val"),
    "test larger than what train and val leave": (["experiment.split.test=149"], [], EXP, "split.test"),
    "split larger than the set after blanks": (
        [], prompts_file("p.jsonl", jsonl(*many(15), *({"instruction": "  "} for _ in range(5))), ""), EXP,
        "split.test"),
    "split larger than the set after filter_empty": (
        [], prompts_file("p.jsonl", jsonl(*many(10, input=""), *many(10, 10, input="x")), "filter_empty: input\n"),
        EXP, "split.val"),
    "split larger than the pool after exclusion": (
        ["experiment.datasets.harmful={train:own-harmful,test:t,exclude:[x]}"],
        [*prompts_file("p.jsonl", jsonl(*many(20)), ""),
         ("data/t.jsonl", "BYTES", jsonl(*many(4, 100))), ("dataset/t.yaml", "ALL", "path: {conf}/data/t.jsonl\n"),
         ("data/x.jsonl", "BYTES", jsonl(*many(10))), ("dataset/x.yaml", "ALL", "path: {conf}/data/x.jsonl\n")],
        EXP, "split.val"),
    "split larger than a pool after a hub test set (an upper bound)": (
        ["experiment.datasets.harmful={train:own-harmful,test:jbb-harmful}"],
        prompts_file("p.jsonl", jsonl(*many(11)), ""), EXP, "split.val"),
    "train_test_split part too small": (
        ["+experiment.split.mode=train_test_split", "+experiment.split.test_fraction=0.5", "experiment.split.test=90"],
        [], EXP, "split.test"),
}



@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_prompt_set_is_one_line_naming_file_and_key(case, conf_copy, tmp_path):
    expect_one_line(CASES[case], conf_copy, tmp_path / "results")


def test_the_lines_named(conf_copy):
    """A repeat names both lines (CSV: the header is line 1); a pool counted with a hub set before it
    says 'at most'; the split line is the one the job gives."""
    def error(case):
        overrides, edits, *_ = CASES[case]
        apply(conf_copy, edits)
        with pytest.raises(ConfigError) as err:
            load_experiment([TINY, *overrides], conf_dir=conf_copy)
        return str(err.value)

    assert error("duplicate prompt (CSV)").endswith("p.csv line 4: duplicate prompt (as line 2)")
    assert error("duplicate prompt (JSON array)").endswith("p.json line 1: duplicate prompt (as line 1)")
    assert error("JSON array item not an object").endswith("p.json line 2: an item of the array must be a JSON object")
    assert error("category_field names no column (CSV)").endswith(
        "key 'category_field': column 'category' not in p.csv's columns ['instruction', 'input', 'cat']")
    assert error("split larger than the set after blanks").endswith(
        "key 'split.test': harmful set 'own-harmful' has 15 usable prompts, train+val+test asks for 16")
    assert "has at most 11 usable prompts, train+val asks for 12" in \
        error("split larger than a pool after a hub test set (an upper bound)")


def test_a_json_array_loads_like_json_lines(conf_copy):
    rows = many(20, category="c")
    apply(conf_copy, prompts_file("p.jsonl", jsonl(*rows), "category_field: category\n"))
    as_lines = prompts.build_prompts(*_splits(conf_copy)).to_pylist()
    apply(conf_copy, prompts_file("p.json", json.dumps(rows, indent=2).encode(), "category_field: category\n"))
    assert prompts.build_prompts(*_splits(conf_copy)).to_pylist() == as_lines


def _splits(conf, *overrides):
    exp = load_experiment([TINY, *overrides], conf_dir=conf)
    return exp.dataset_splits, exp.split, exp.file


# ------------------------------------------------------------------ drops are counted: log and metadata

def _tiny_set_with_drops(conf):
    """20 prompts, 2 blank (one whitespace, one null), 3 filtered out by filter_empty, 1 by where."""
    rows = [*many(20, input="", kind="std"), {"instruction": "  ", "input": "", "kind": "std"},
            {"instruction": None, "input": "", "kind": "std"},
            *many(3, 50, input="needs this text", kind="std"), *many(1, 60, input="", kind="contextual")]
    apply(conf, prompts_file("p.jsonl", jsonl(*rows), "filter_empty: input\nwhere: {kind: std}\n"))


def test_drops_are_counted_in_the_log(conf_copy, caplog):
    _tiny_set_with_drops(conf_copy)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        prompts.build_prompts(*_splits(conf_copy))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.prompts"]
    harmful = [line for line in lines if "own-harmful" in line]
    assert harmful == ["harmful test+val+train: dataset own-harmful, loaded 20, sampled 20, kept 20; "
                       "dropped 3 filter_empty, 1 where, 2 blank"], lines


def test_drops_are_counted_in_the_metadata(conf_copy, tmp_path):
    _tiny_set_with_drops(conf_copy)
    out = tmp_path / "prompts.parquet"
    splits, split, exp_file = _splits(conf_copy)
    prompts.run(splits, split, str(out), exp_file=exp_file)
    pools = {p["dataset"]: p for p in json.loads(pq.read_schema(out).metadata[b"pools"])}
    assert pools["own-harmful"]["dropped"] == {"filter_empty": 3, "where": 1, "blank": 2, "repeat": 0,
                                               "drawn_before": 0, "excluded": 0}
    assert pools["own-harmless"]["dropped"] == dict.fromkeys(pools["own-harmful"]["dropped"], 0)


# ------------------------------------------------------------------ hub sets: checked in the job, before it writes

def _fake_hub(monkeypatch, rows):
    """`datasets.load_dataset` answering every hub id with these rows (no network)."""
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))


def _hub_experiment(conf, yaml):
    (conf / "dataset" / "hub.yaml").write_text("hub_id: someone/set\n" + yaml)
    return _splits(conf, "experiment.datasets.harmful=hub")


@pytest.mark.parametrize("yaml,key", [("field: Goal\n", "field"), ("category_field: Category\n", "category_field"),
                                      ("filter_empty: inputs\n", "filter_empty"), ("id_field: ID\n", "id_field"),
                                      ("where: {kind: std}\n", "where.kind")])
def test_a_hub_key_naming_no_column_stops_the_job_before_it_writes(conf_copy, monkeypatch, tmp_path, yaml, key):
    _fake_hub(monkeypatch, many(20, input=""))
    splits = _hub_experiment(conf_copy, yaml)  # a hub set is not known while the DAG is built
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ConfigError) as err:
        prompts.run(*splits[:2], str(folder / "prompts.parquet"), exp_file=splits[2])
    assert err.value.file.endswith("dataset/hub.yaml") and err.value.key == key, str(err.value)
    assert "someone/set's columns ['instruction', 'input']" in str(err.value)
    assert not list(folder.iterdir())


def test_hub_repeats_and_blanks_are_dropped_and_counted(conf_copy, monkeypatch, tmp_path):
    """A hub set cannot be fixed here: its repeats (re-cased too) are dropped by the pool, and counted."""
    rows = [*many(20), {"instruction": "HARMFUL TASK NUMBER 3."}, {"instruction": "Harmful task number 4."},
            {"instruction": ""}, {"instruction": None}]
    _fake_hub(monkeypatch, rows)
    out = tmp_path / "prompts.parquet"
    splits = _hub_experiment(conf_copy, "")
    prompts.run(*splits[:2], str(out), exp_file=splits[2])
    pools = {p["dataset"]: p for p in json.loads(pq.read_schema(out).metadata[b"pools"])}
    assert (pools["hub"]["loaded"], pools["hub"]["kept"]) == (22, 20)
    assert pools["hub"]["dropped"] == {"filter_empty": 0, "where": 0, "blank": 2, "repeat": 2, "drawn_before": 0,
                                       "excluded": 0}


# ------------------------------------------------------------------ through Snakemake's command line

@pytest.mark.parametrize("overrides,edits,key", [
    ("experiment=tiny experiment.split.train=500", [], "split.train"),
    ("experiment=tiny", CASES["duplicate prompt (CSV)"][1], "path"),
])
def test_snakemake_prints_one_line_and_writes_nothing(tmp_path, conf_copy, overrides, edits, key):
    apply(conf_copy, edits)
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-d", str(work),
         "--config", f"overrides={overrides}", f"conf_dir={conf_copy}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert len(lines) == 1 and f"key '{key}'" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in work.iterdir()) in ([], [".snakemake"])
