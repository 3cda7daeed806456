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


def test_test_split_from_another_set_never_repeats_a_training_prompt(tmp_path):
    """datasets.harmful: {train: A, test: B}: train/val from A, test from B minus anything drawn from A."""
    import json
    import shutil

    from pipeline.config import DEFAULT_CONF_DIR, load_experiment

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    own = [json.loads(line) for line in open(DEFAULT_CONF_DIR.parent / "pipeline" / "data" / "harmful.jsonl")]
    # a "benchmark" that shares 150 of its 160 prompts with the training set, re-cased
    other = [{"goal": r["instruction"].upper()} for r in own[:150]] + [{"goal": f"Fresh harmful task {i}."}
                                                                         for i in range(10)]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    (conf / "dataset" / "bench.yaml").write_text(f"path: {tmp_path / 'bench.jsonl'}\nfield: goal\n")
    exp = load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:own-harmful,test:bench}",
                           "experiment.split.train=100", "experiment.split.val=50", "experiment.split.test=6"],
                          conf_dir=conf)
    rows = pl.DataFrame(build(exp).to_pylist()).filter(pl.col("label") == "harmful")
    test = rows.filter(pl.col("split") == "test")
    assert set(test["dataset"]) == {"bench"} and test.height == 6
    assert set(rows.filter(pl.col("split") != "test")["dataset"]) == {"own-harmful"}
    drawn = {t.lower() for t in rows.filter(pl.col("split") != "test")["instruction"]}
    assert not drawn & {t.lower() for t in test["instruction"]}
    # 150 drawn from own-harmful; of bench's 160 only 10 are new + the 10 own prompts not drawn
    with pytest.raises(ConfigError) as err:
        exp = load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:own-harmful,test:bench}",
                               "experiment.split.train=100", "experiment.split.val=50", "experiment.split.test=30"],
                              conf_dir=conf)
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)
    assert "'bench'" in str(err.value) and "usable prompts" in str(err.value)


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
