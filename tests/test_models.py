"""Preparing the embedded models: the assembled GGUF is verified before it is used."""

import pytest

from pipeline.config import load_model
from pipeline.errors import ConfigError
from pipeline.models import prepare


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
    import dataclasses

    from pipeline.models import load_tokenizer, set_pad_token
    from tests.conftest import tiny_spec

    spec = tiny_spec("tiny-chat")
    tok = load_tokenizer(spec, tiny_dirs["tiny-chat"])
    tok.pad_token, tok.eos_token = None, None  # as Qwen 1's remote-code tokenizer
    with pytest.raises(ConfigError) as err:
        set_pad_token(tok, spec)
    assert err.value.key == "pad_token" and err.value.file.endswith("model/tiny-chat.yaml")
    set_pad_token(tok, dataclasses.replace(spec, pad_token="<|im_start|>"))
    assert tok.pad_token == "<|im_start|>"
    with pytest.raises(ConfigError, match="not a token"):
        set_pad_token(tok, dataclasses.replace(spec, pad_token="<|extra_0|>"))


def test_qwen1_pads_as_the_direction_paper_does():
    from pipeline.config import DEFAULT_CONF_DIR

    assert load_model("qwen-1.8b-chat", DEFAULT_CONF_DIR, "test", "model").pad_token == "<|extra_0|>"
