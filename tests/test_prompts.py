"""Stage 1: the prompt sets, loaded through `datasets` and split with the seed."""

import polars as pl
import pytest

import paper_standins as ps
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
    """Refused while the DAG is built (local files are counted there), and by the job with the same line."""
    overrides = ["experiment=tiny", "experiment.split.train=500"]
    with pytest.raises(ConfigError) as at_load:
        load_experiment(overrides, conf_dir=conf_copy)
    assert at_load.value.key == "split.train"
    exp = load_experiment(overrides, conf_dir=conf_copy, check_models=False)
    with pytest.raises(ConfigError) as in_job:
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)
    assert str(in_job.value) == str(at_load.value)


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
    with pytest.raises(ConfigError) as err:  # a local file: refused while the DAG is built
        load_experiment(["experiment=tiny", "experiment.datasets.harmful={train:a,val:v,test:t}",
                         "experiment.split.train=4", "experiment.split.val=2", "experiment.split.test=2"],
                        conf_dir=conf)
    assert "dataset/v.yaml: key 'where.Functional': column 'Functional' not in" in str(err.value)


# ------------------------------------------------------------------ the papers' splits, on sets of the real sizes

# scikit-learn 1.9.1's train_test_split(list(range(n)), test_size=0.2, random_state=42), computed once with
# scikit-learn itself (not a dependency): AdvBench's 520 rows (held-out part's first 100, kept part's first 32)
# and the 31,323 Alpaca rows without an input.
SKLEARN_520_TEST = [275, 93, 6, 167, 90, 513, 362, 228, 192, 482, 218, 180, 307, 508, 10, 381, 371, 30, 494, 137,
                    155, 84, 117, 172, 323, 331, 79, 452, 506, 253, 249, 340, 333, 9, 278, 68, 417, 203, 393, 305,
                    299, 347, 55, 515, 519, 158, 222, 255, 153, 176, 210, 289, 76, 447, 349, 148, 446, 73, 2, 77,
                    400, 516, 487, 297, 63, 483, 281, 70, 173, 33, 72, 78, 0, 11, 338, 22, 478, 490, 104, 82, 185,
                    140, 18, 356, 132, 124, 101, 39, 470, 46, 314, 448, 365, 177, 286, 346, 131, 433, 456, 69]
SKLEARN_520_TRAIN = [434, 436, 208, 332, 220, 502, 324, 184, 497, 355, 320, 195, 335, 492, 450, 507, 86, 431, 75,
                     457, 15, 421, 182, 473, 19, 397, 56, 500, 342, 440, 404, 25]
SKLEARN_31323_TEST_HEAD = [7278, 15416, 14003, 13713, 23817, 30387, 8362, 11096]
SKLEARN_31323_TRAIN_HEAD = [17938, 8270, 16387, 12347, 12585, 28347, 1940, 18273]


def test_holdout_indices_are_scikit_learns():
    kept, held = prompts.holdout_indices(520, 0.2, 42)
    assert (len(kept), len(held)) == (416, 104)  # ceil(0.2 x 520) held out
    assert held[:100] == SKLEARN_520_TEST and kept[:32] == SKLEARN_520_TRAIN
    kept, held = prompts.holdout_indices(31323, 0.2, 42)
    assert (len(kept), len(held)) == (25058, 6265)
    assert held[:8] == SKLEARN_31323_TEST_HEAD and kept[:8] == SKLEARN_31323_TRAIN_HEAD
    assert sorted(kept + held) == list(range(31323))


def _paper_conf(tmp_path):
    """conf/ copy whose paper sets are local files of the real sets' sizes and overlaps (tests/paper_standins.py)."""
    data = ps.write_datasets(tmp_path / "data")
    return ps.write_conf(tmp_path / "conf", {}, data), data


def test_train_test_split_mode_reproduces_the_base_models_split(tmp_path):
    """The base-models post: AdvBench cut 80/20 by train_test_split(seed 42); the direction from the first
    32 of the kept part, the test prompts the first 100 of the held-out part; Alpaca (rows without an
    input, a whitespace-only input counting as none) cut the same way."""
    import json

    conf, data = _paper_conf(tmp_path)
    exp = load_experiment(["experiment=base_models_refuse_qwen"], conf_dir=conf, check_models=False)
    assert exp.split.mode == "train_test_split" and exp.split.test_fraction == 0.2 and exp.split.seed == 42
    table = build(exp)
    rows = pl.DataFrame(table.to_pylist())
    adv = data["_sets"]["advbench"]
    harmful = rows.filter(pl.col("label") == "harmful")
    assert harmful.filter(pl.col("split") == "test")["instruction"].to_list() == [adv[i] for i in SKLEARN_520_TEST]
    assert harmful.filter(pl.col("split") == "train")["instruction"].to_list() == [adv[i] for i in SKLEARN_520_TRAIN]
    alpaca = data["_alpaca"]
    assert len(alpaca) == 31323
    harmless = rows.filter(pl.col("label") == "harmless")
    test = harmless.filter(pl.col("split") == "test")["instruction"].to_list()
    assert test[:8] == [alpaca[i] for i in SKLEARN_31323_TEST_HEAD] and len(test) == 100
    kept, held = prompts.holdout_indices(31323, 0.2, 42)
    assert test == [alpaca[i] for i in held[:100]]
    train = harmless.filter(pl.col("split") == "train")["instruction"].to_list()
    assert train == [alpaca[i] for i in kept[:32]] and train[:8] == [alpaca[i] for i in SKLEARN_31323_TRAIN_HEAD]
    pools = json.loads(table.schema.metadata[b"pools"])
    assert {(p["label"], p["loaded"], p["kept"], p["held_out"]) for p in pools} == \
        {("harmful", 520, 416, 104), ("harmless", 31323, 25058, 6265)}


def test_train_test_split_mode_errors_are_one_line(tmp_path):
    conf, _ = _paper_conf(tmp_path)
    exp = load_experiment(["experiment=base_models_refuse_qwen", "experiment.split.test=105"], conf_dir=conf,
                          check_models=False)
    with pytest.raises(ConfigError) as err:
        build(exp)
    assert "harmful set 'advbench' has 520 usable prompts: its test part holds 104, the split asks for 105" \
        in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=base_models_refuse_qwen",
                         "experiment.datasets.harmful={train:advbench,test:jbb-harmful}"], conf_dir=conf,
                        check_models=False)
    assert "key 'datasets.harmful': split mode train_test_split cuts one set" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=base_models_refuse_qwen", "~experiment.split.test_fraction"], conf_dir=conf,
                        check_models=False)
    assert str(err.value).endswith("key 'split.test_fraction': missing")
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=tiny", "+experiment.split.test_fraction=0.2"], check_models=False)
    assert "key 'split.test_fraction': applies to mode train_test_split only" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=single_direction", "experiment.datasets.harmful.exclude=[tdc2023]"],
                        conf_dir=conf, check_models=False)
    assert "key 'datasets.harmful.exclude[0]': 'tdc2023' is drawn from" in str(err.value)


def test_the_direction_papers_train_pool(tmp_path):
    """Each source capped at 128 (a seeded sample) before pooling, then every prompt of HarmBench val and of
    the test sources (JailbreakBench, HarmBench test, StrongREJECT) removed: MaliciousInstruct keeps 88,
    TDC2023 55 less the re-cased val repeat (54; the code compares exact strings and keeps it), AdvBench 128
    less the sampled ones in the test sources (117 in the code's one unseeded draw). Uncapped, AdvBench alone
    gave 487; without the excluded sets, MaliciousInstruct kept all 100."""
    import json
    import random

    conf, data = _paper_conf(tmp_path)
    sets = data["_sets"]
    test_sources = set(sets["jbb-harmful"]) | set(sets["harmbench-test"]) | set(sets["strongreject"])
    exp = load_experiment(["experiment=single_direction"], conf_dir=conf, check_models=False)
    assert exp.split.pool_cap == 128
    assert [s.name for s in exp.dataset_splits["harmful"]["exclude"]] == ["harmbench-test", "strongreject"]
    table = build(exp)
    pools = {(p["label"], p["dataset"]): p for p in json.loads(table.schema.metadata[b"pools"])}
    sample = random.Random(exp.split.seed).sample(range(520), 128)  # the cap's draw, indices into AdvBench
    adv_kept = sum(sets["advbench"][i] not in test_sources for i in sample)
    assert 110 < adv_kept < 128
    drawn = set(sets["jbb-harmful"]) | set(sets["harmbench-val"])  # the test and val pools, drawn first
    before = sum(sets["advbench"][i] in drawn for i in sample)
    assert pools[("harmful", "advbench")] == {"label": "harmful", "splits": "train", "dataset": "advbench",
                                              "loaded": 520, "sampled": 128, "kept": adv_kept,
                                              "dropped": {"filter_empty": 0, "where": 0, "blank": 0, "repeat": 0,
                                                          "drawn_before": before, "excluded": 128 - adv_kept - before}}
    assert (pools[("harmful", "malicious-instruct")]["kept"], pools[("harmful", "tdc2023")]["kept"]) == (88, 54)
    assert pools[("harmful", "harmbench-val")]["kept"] == 39  # 41 standard rows, 2 of them JailbreakBench's
    rows = pl.DataFrame(table.to_pylist()).filter(pl.col("label") == "harmful")
    train = rows.filter(pl.col("split") == "train")
    assert train.height == 128 and not set(train["instruction"]) & test_sources
    assert rows.filter(pl.col("split") == "val").height == 32
    assert sorted(rows.filter(pl.col("split") == "test")["instruction"]) == sorted(sets["jbb-harmful"])
    # the pool holds adv_kept + 88 + 54: asking for one more names it
    with pytest.raises(ConfigError) as err:
        build(load_experiment(["experiment=single_direction", f"experiment.split.train={adv_kept + 88 + 54 + 1}"],
                              conf_dir=conf, check_models=False))
    assert f"has {adv_kept + 88 + 54} usable prompts" in str(err.value)
