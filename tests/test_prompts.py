"""Stage 1: the prompt sets, loaded through `datasets` and split with the seed."""

import polars as pl
import pytest

from pipeline import prompts
from pipeline.config import load_experiment
from pipeline.errors import ConfigError


def build(exp):
    return prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)


def test_prompt_split_is_seeded_and_disjoint(tiny_experiment):
    a = build(tiny_experiment).to_pylist()
    b = build(tiny_experiment).to_pylist()
    assert a == b
    ids = [r["prompt_id"] for r in a]
    assert len(ids) == len(set(ids))
    counts = pl.DataFrame(a).group_by("label", "split").len().sort("label", "split")
    assert counts["len"].to_list() == [4, 8, 4] * 2  # test, train, val per label


def test_a_test_benchmark_is_kept_whole_and_its_overlap_leaves_the_train_pool(tmp_path):
    """datasets.harmful: {train: A, test: B} where B repeats 11 of A's prompts (as JailbreakBench repeats
    AdvBench goals): all of B is the test set, and train/val come from A without those 11."""
    import json
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    own = [json.loads(line)["instruction"] for line in open(DEFAULT_CONF_DIR.parent / "pipeline" / "data" / "harmful.jsonl")]
    bench = [t.upper() for t in own[:11]] + [f"Fresh harmful task number {i}." for i in range(49)]  # re-cased overlap
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps({"goal": g}) + "\n" for g in bench))
    (conf / "dataset" / "bench.yaml").write_text(f"path: {tmp_path / 'bench.jsonl'}\nfield: goal\n")
    overrides = ["experiment=tiny", "experiment.datasets.harmful={train:own-harmful,test:bench}",
                 "experiment.split.train=80", "experiment.split.val=20", "experiment.split.test=60"]
    rows = pl.DataFrame(build(load_experiment(overrides, conf_dir=conf)).to_pylist()).filter(
        pl.col("label") == "harmful")
    test = rows.filter(pl.col("split") == "test")
    assert set(test["dataset"]) == {"bench"} and sorted(test["instruction"]) == sorted(bench)
    train_val = rows.filter(pl.col("split") != "test")
    assert set(train_val["dataset"]) == {"own-harmful"} and train_val.height == 100
    assert not {t.lower() for t in train_val["instruction"]} & {t.lower() for t in bench}
    # one prompt more than the cleaned pool (160 - 11) holds: the error names the train set
    with pytest.raises(ConfigError) as err:
        build(load_experiment(overrides[:-3] + ["experiment.split.train=100", "experiment.split.val=50",
                                                "experiment.split.test=60"], conf_dir=conf))
    assert "'own-harmful' has 149 usable prompts" in str(err.value)


def test_bad_dataset_split_mapping():
    from pipeline.config import load_experiment

    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "experiment.datasets.harmful={test:own-harmful}"])
    assert "key 'datasets.harmful.train': missing" in str(err.value)


def test_too_few_prompts_for_the_split(conf_copy):
    exp = load_experiment(["experiment=tiny", "experiment.split.train=500"], conf_dir=conf_copy)
    with pytest.raises(ConfigError, match="split"):
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)


def test_hub_dataset_offline_is_one_clear_line(conf_copy, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp = load_experiment(["experiment=tiny", "experiment.datasets.harmful=advbench"], conf_dir=conf_copy)
    with pytest.raises(ConfigError) as info:
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)
    msg = str(info.value)
    assert "dataset/advbench.yaml" in msg and "hub_id" in msg and "\n" not in msg


def _pool_conf(tmp_path):
    """conf/ copy with sets A, B (B repeats one of A's prompts), a test set T repeating one of B's, and a
    HarmBench-shaped CSV V whose contextual rows must be left out."""
    import csv
    import json
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    a = [f"Set A task {i}." for i in range(30)]
    b = ["set a task 3."] + [f"Set B task {i}." for i in range(10)]  # re-cased repeat of A's
    t = ["Set B task 0.", "Test-only task."]
    for name, rows in (("a", a), ("b", b), ("t", t)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
        (conf / "dataset" / f"{name}.yaml").write_text(f"path: {tmp_path / f'{name}.jsonl'}\nfield: prompt\n")
    with open(tmp_path / "v.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Behavior", "FunctionalCategory", "ContextString", "BehaviorID"])
        w.writeheader()
        w.writerows([{"Behavior": f"Val task {i}.", "FunctionalCategory": "standard", "ContextString": "",
                      "BehaviorID": f"v{i}"} for i in range(6)])
        w.writerows([{"Behavior": f"Rewrite this, with commas ({i}).", "FunctionalCategory": "contextual",
                      "ContextString": 'A "quoted", long text.', "BehaviorID": f"c{i}"} for i in range(4)])
    (conf / "dataset" / "v.yaml").write_text(f"path: {tmp_path / 'v.csv'}\nformat: csv\nfield: Behavior\n"
                                             "id_field: BehaviorID\nwhere: {FunctionalCategory: standard}\n")
    return conf, a, b, t


def test_a_pool_of_sets_is_drawn_as_one_without_repeats(tmp_path):
    """`train: [a, b]` draws from both sets as one shuffled pool; the pool drops its own repeat and the
    test set's prompts; a CSV val set keeps only the rows `where:` selects."""
    conf, a, b, t = _pool_conf(tmp_path)
    overrides = ["experiment=tiny", "experiment.datasets.harmful={train:[a,b],val:v,test:t}",
                 "experiment.split.train=38", "experiment.split.val=6", "experiment.split.test=2"]
    rows = pl.DataFrame(build(load_experiment(overrides, conf_dir=conf)).to_pylist()).filter(
        pl.col("label") == "harmful")
    train = rows.filter(pl.col("split") == "train")
    # the pool: 30 + 11 prompts, less B's repeat of A and the test set's "Set B task 0." = 39; 38 drawn
    assert train.height == 38 and set(train["dataset"]) == {"a", "b"}
    assert train["instruction"].str.to_lowercase().n_unique() == 38
    assert "Set B task 0." not in train["instruction"].to_list()
    assert set(train["instruction"]) <= set(a) | set(b[1:])
    val = rows.filter(pl.col("split") == "val")
    assert sorted(val["prompt_id"]) == [f"v{i}" for i in range(6)] and set(val["dataset"]) == {"v"}
    assert sorted(rows.filter(pl.col("split") == "test")["instruction"]) == sorted(t)
    # one more than the pool holds: the error names the pool
    with pytest.raises(ConfigError) as err:
        build(load_experiment([*overrides[:2], "experiment.split.train=40", *overrides[3:]], conf_dir=conf))
    assert "harmful set 'a+b' has 39 usable prompts" in str(err.value)


def test_bad_pools_and_filters_are_one_line(tmp_path):
    conf, *_ = _pool_conf(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:[a,a],test:t}"], conf_dir=conf)
    assert "key 'datasets.harmful.train': names a set twice" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:[a,nope],test:t}"], conf_dir=conf)
    assert "datasets.harmful.train[1]" in str(err.value) and "nope" in str(err.value)
    (conf / "dataset" / "v.yaml").write_text((conf / "dataset" / "v.yaml").read_text().replace(
        "FunctionalCategory:", "Functional:"))
    exp = load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:a,val:v,test:t}",
                           "experiment.split.train=4", "experiment.split.val=2", "experiment.split.test=2"],
                          conf_dir=conf)
    with pytest.raises(ConfigError) as err:
        build(exp)
    assert "dataset/v.yaml: key 'where.Functional': column 'Functional' not in" in str(err.value)
