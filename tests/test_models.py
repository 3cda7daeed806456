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
