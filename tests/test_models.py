"""Preparing the embedded models: the assembled GGUF is verified before it is used."""

import pytest

from pipeline.config import load_model
from pipeline.errors import ConfigError
from pipeline.models import prepare

from conftest import tiny_spec


def test_checksum_mismatch_leaves_nothing(conf_copy, tmp_path):
    text = (conf_copy / "model" / "gemma-3-270m.yaml").read_text()
    (conf_copy / "model" / "gemma-3-270m.yaml").write_text(text.replace("a5fd3b62", "00000000"))
    spec = load_model("gemma-3-270m", conf_copy, "test", "model")
    out = tmp_path / "models" / "gemma-3-270m"
    with pytest.raises(ConfigError) as info:
        prepare(spec, out)
    assert "model/gemma-3-270m.yaml" in str(info.value) and "sha256" in str(info.value)
    assert "checksum mismatch" in str(info.value)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_layers_come_from_the_gguf_header_without_assembling_it():
    from pipeline.config import DEFAULT_CONF_DIR
    from pipeline.sources import gguf_metadata, gguf_part_paths

    qwen = load_model("qwen2.5-coder-0.5b-instruct", DEFAULT_CONF_DIR, "test", "model")
    assert gguf_metadata(gguf_part_paths(qwen)) == {"n_layers": 24, "hidden_size": 896, "context": 32768}
    gemma = load_model("gemma-3-270m", DEFAULT_CONF_DIR, "test", "model")
    assert gguf_metadata(gguf_part_paths(gemma))["n_layers"] == 18


def test_not_a_gguf_gives_no_metadata(tmp_path):
    from pipeline.sources import gguf_metadata

    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04 not a gguf at all")
    assert gguf_metadata([tmp_path / "x.bin"]) is None


def test_a_tokenizer_without_pad_or_eos_needs_the_yaml_pad_token(tiny_dirs):
    from pipeline.models import load_tokenizer, set_pad_token
    from tests.conftest import tiny_spec

    spec = tiny_spec("tiny-chat")
    tok = load_tokenizer(spec, tiny_dirs["tiny-chat"])
    tok.pad_token, tok.eos_token = None, None  # as Qwen 1's remote-code tokenizer
    with pytest.raises(ConfigError) as err:
        set_pad_token(tok, spec)
    assert err.value.key == "pad_token" and err.value.file.endswith("model/tiny-chat.yaml")
    set_pad_token(tok, spec.model_copy(update={"pad_token": "<|im_start|>"}))
    assert tok.pad_token == "<|im_start|>"
    with pytest.raises(ConfigError, match="not a token"):
        set_pad_token(tok, spec.model_copy(update={"pad_token": "<|extra_0|>"}))


def test_qwen1_pads_as_the_direction_paper_does():
    from pipeline.config import DEFAULT_CONF_DIR

    assert load_model("qwen-1.8b-chat", DEFAULT_CONF_DIR, "test", "model").pad_token == "<|extra_0|>"


# The dtype each paper's code loads each model in (issue 16): the base-models post's extract/apply_refusal_dir.py
# (Qwen through HookedTransformer's float32 default; Gemma 2, LLaMA and Vicuna in float16) and the direction
# paper's pipeline/model_utils/*_model.py (Qwen 1, Llama-2, Yi float16; Gemma, Llama-3 bfloat16).
PAPER_DTYPES = {"qwen1.5-0.5b": "float32", "qwen1.5-0.5b-chat": "float32", "gemma-2-9b": "float16",
                "gemma-2-9b-it": "float16", "llama-7b": "float16", "vicuna-7b-v1.1": "float16",
                "qwen-1.8b-chat": "float16", "gemma-2b-it": "bfloat16", "llama-2-7b-chat": "float16",
                "llama-3-8b-instruct": "bfloat16", "yi-6b-chat": "float16"}


@pytest.mark.parametrize("name", sorted(PAPER_DTYPES))
def test_paper_models_load_in_the_papers_dtype(name):
    import torch

    from pipeline.models import pick_dtype

    spec = tiny_spec(name)
    assert spec.dtype == PAPER_DTYPES[name]
    assert pick_dtype(spec, torch.device("cpu")) == getattr(torch, PAPER_DTYPES[name])  # CPUs run all three


def test_a_dtype_the_gpu_cannot_run_is_one_line(monkeypatch):
    """bfloat16 on a pre-Ampere GPU: the job stops naming the model YAML's dtype; `auto` falls back to float16."""
    import torch

    from pipeline.errors import ConfigError
    from pipeline.models import pick_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    cuda = torch.device("cuda")
    spec = tiny_spec("llama-3-8b-instruct")
    with pytest.raises(ConfigError) as err:
        pick_dtype(spec, cuda)
    assert str(err.value) == ("conf/model/llama-3-8b-instruct.yaml: key 'dtype': bfloat16, but this GPU "
                              "(Tesla V100-SXM2-16GB) has no native bfloat16; set float16 or float32")
    assert pick_dtype(tiny_spec("llama-2-7b-chat"), cuda) == torch.float16
    assert pick_dtype(spec.model_copy(update={"dtype": "auto"}), cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pick_dtype(spec, cuda) == torch.bfloat16
    assert pick_dtype(spec.model_copy(update={"dtype": "auto"}), cuda) == torch.bfloat16


def test_the_dtype_check_runs_before_any_job(monkeypatch):
    """With device cuda on a machine whose GPU lacks bfloat16, composing single_direction stops at Gemma's YAML."""
    import torch

    from pipeline.checks import check_dtypes
    from pipeline.config import load_experiment
    from pipeline.errors import ConfigError

    exp = load_experiment(["experiment=single_direction", "experiment.device=cuda"], check_models=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError) as err:
        check_dtypes(exp)
    assert str(err.value).startswith("conf/model/gemma-2b-it.yaml: key 'dtype': bfloat16, but this GPU (Tesla T4)")
    check_dtypes(load_experiment(["experiment=single_direction", "experiment.device=cpu"], check_models=False))


def test_the_dequantized_cache_is_keyed_by_checksum_and_versions(monkeypatch, tmp_path):
    from pipeline.config import DEFAULT_CONF_DIR
    from pipeline.models import dequantized_cache

    gemma = load_model("gemma-3-270m", DEFAULT_CONF_DIR, "test", "model")
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(tmp_path))
    key = dequantized_cache(gemma)
    assert key.parent == tmp_path / "dequantized" and key.name.startswith(gemma.source.sha256[:32])
    assert "-transformers" in key.name and "-gguf" in key.name
    monkeypatch.setenv("REFUSAL_CACHE_DIR", "")
    assert dequantized_cache(gemma) is None


@pytest.mark.slow
def test_a_second_preparation_links_the_cached_files(tmp_path):
    """Preparing the embedded model where the cache holds it links the cached files instead of
    dequantizing (the same inodes), equal to what the tests prepared in results/models, and it loads.
    (In a clone whose results/models came through the cache, nothing here dequantizes.)"""
    from pipeline.config import DEFAULT_CONF_DIR
    from pipeline.models import PREPARED, dequantized_cache, load_tokenizer

    from conftest import prepared_model

    gemma = load_model("gemma-3-270m", DEFAULT_CONF_DIR, "test", "model")
    first = prepared_model(gemma.name, gemma)
    cache = dequantized_cache(gemma)
    if not cache.is_dir():  # results/models prepared before the cache existed: fill it once
        prepare(gemma, tmp_path / "filling")
    again = tmp_path / "again"
    prepare(gemma, again)
    files = sorted(p.name for p in cache.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert sorted(p.name for p in again.iterdir()) == sorted([*files, PREPARED])
    for name in files:
        assert (again / name).stat().st_ino == (cache / name).stat().st_ino, name
        assert (again / name).stat().st_size == (first / name).stat().st_size, name
    assert (again / "config.json").read_text() == (first / "config.json").read_text()
    assert load_tokenizer(gemma, again)("Hello", add_special_tokens=False)["input_ids"]
