"""Bad input: one clear line naming the file and the key, before heavy work, no partial output."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import prompts
from pipeline.config import load_experiment, load_model
from pipeline.errors import ConfigError
from pipeline.models import prepare

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def conf(tmp_path):
    dst = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", dst)
    return dst


def error_of(overrides, conf_dir):
    with pytest.raises(ConfigError) as info:
        load_experiment(overrides, conf_dir=conf_dir)
    return str(info.value)


def test_unknown_model(conf):
    msg = error_of(["experiment=tiny", "experiment.models=[tiny-chat,nope]"], conf)
    assert "experiment/tiny.yaml" in msg and "models[1]" in msg and "unknown model 'nope'" in msg


def test_unknown_experiment(conf):
    msg = error_of(["experiment=nope"], conf)
    assert "config.yaml" in msg and "nope" in msg


def test_unknown_dataset(conf):
    msg = error_of(["experiment=tiny", "experiment.datasets.harmful=nope"], conf)
    assert "datasets.harmful" in msg and "unknown dataset 'nope'" in msg


def test_unknown_template(conf):
    (conf / "model" / "tiny-chat.yaml").write_text(
        (conf / "model" / "tiny-chat.yaml").read_text().replace("template: chatml", "template: nope"))
    msg = error_of(["experiment=tiny"], conf)
    assert "model/tiny-chat.yaml" in msg and "'template'" in msg and "unknown template 'nope'" in msg


def test_template_without_instruction(conf):
    (conf / "template" / "chatml.yaml").write_text('text: "<|im_start|>user\\n{prompt}<|im_end|>\\n"\n')
    msg = error_of(["experiment=tiny"], conf)
    assert "template/chatml.yaml" in msg and "'text'" in msg and "{instruction}" in msg


def test_missing_dataset_file(conf):
    (conf / "dataset" / "own-harmful.yaml").write_text("path: data/does-not-exist.jsonl\n")
    msg = error_of(["experiment=tiny"], conf)
    assert "dataset/own-harmful.yaml" in msg and "'path'" in msg and "not found" in msg


def test_empty_prompt_set(conf, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (conf / "dataset" / "own-harmful.yaml").write_text(f"path: {empty}\n")
    msg = error_of(["experiment=tiny"], conf)  # found while the DAG is built
    assert "dataset/own-harmful.yaml" in msg and "empty" in msg


def test_too_few_prompts_for_the_split(conf):
    exp = load_experiment(["experiment=tiny", "experiment.split.train=500"], conf_dir=conf)
    with pytest.raises(ConfigError, match="split"):
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)


def test_pair_with_different_hidden_sizes(conf):
    msg = error_of(["experiment=tiny", "experiment.models=[tiny-chat,gemma-3-270m]",
                    "experiment.pairs=[{base: gemma-3-270m, chat: tiny-chat}]"], conf)
    assert "pairs[0]" in msg and "hidden sizes differ" in msg


def test_hub_dataset_offline_is_one_clear_line(conf, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exp = load_experiment(["experiment=tiny", "experiment.datasets.harmful=advbench"], conf_dir=conf)
    with pytest.raises(ConfigError) as info:
        prompts.build_prompts(exp.dataset_splits, exp.split, exp.file)
    msg = str(info.value)
    assert "dataset/advbench.yaml" in msg and "hub_id" in msg and "\n" not in msg


def test_checksum_mismatch_leaves_nothing(conf, tmp_path):
    text = (conf / "model" / "gemma-3-270m.yaml").read_text()
    (conf / "model" / "gemma-3-270m.yaml").write_text(text.replace("a5fd3b62", "00000000"))
    spec = load_model("gemma-3-270m", conf, "test", "model")
    out = tmp_path / "models" / "gemma-3-270m"
    with pytest.raises(ConfigError) as info:
        prepare(spec, out)
    assert "model/gemma-3-270m.yaml" in str(info.value) and "sha256" in str(info.value)
    assert "checksum mismatch" in str(info.value)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_missing_gguf_part(conf):
    text = (conf / "model" / "gemma-3-270m.yaml").read_text()
    (conf / "model" / "gemma-3-270m.yaml").write_text(text.replace("part03", "part99"))
    msg = error_of(["experiment=tiny", "experiment.models=[gemma-3-270m]", "experiment.pairs=[]"], conf)
    assert "gguf_parts[3]" in msg and "not found" in msg


def test_snakemake_reports_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-d", str(tmp_path),
         "--config", "overrides=experiment=tiny experiment.models=[nope]"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "config error" in l]
    assert len(lines) == 1 and "unknown model 'nope'" in lines[0] and "models[0]" in lines[0]
    assert not (tmp_path / "results").exists()
