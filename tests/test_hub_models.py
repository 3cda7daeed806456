"""Hub models: prepare pins a snapshot from the hub cache, later jobs load it without the network.

No test reaches the network: a folder laid out like the real hub cache (refs/, snapshots/<commit>/
holding a tiny random model) stands in for the hub, and every socket and HTTP client send is
replaced by one that records the attempt and fails.
"""

import importlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import filter_repo_objects

from conftest import assert_one_line_error
from pipeline import models
from pipeline.config import load_model
from pipeline.errors import ConfigError
from pipeline.models import PREPARED, hub_patterns, load, prepare, set_offline

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/tiny"


# ------------------------------------------------------------------ fixtures


@pytest.fixture()
def no_network(monkeypatch):
    """Every way out raises and is recorded (libraries swallow connection errors, so record them too)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:2] or kwargs)[:200])
        raise ConnectionRefusedError("a test touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for module, classes in (("httpx2", ("Client", "AsyncClient")), ("httpx", ("Client", "AsyncClient")),
                            ("requests", ("Session",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for cls in classes:
            if hasattr(mod, cls):
                monkeypatch.setattr(getattr(mod, cls), "send", refuse)
    return attempts


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, tiny_dirs):
    """A hub cache holding org/tiny at COMMIT (refs/main -> COMMIT); returns the snapshot folder."""
    repo = tmp_path / "hub-cache" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_dirs["tiny-chat"], snapshot, ignore=shutil.ignore_patterns(PREPARED))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    # Read at call time by prepare; huggingface_hub's own constant was fixed at import.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return snapshot


def hub_spec(conf: Path, revision: str | None = COMMIT, repo: str = REPO):
    rev = f", revision: '{revision}'" if revision else ""
    (conf / "model" / "hubby.yaml").write_text(
        f"source: {{hub: {repo}{rev}}}\ntemplate: chatml\nrole: chat\nrefusal_tokens: ['I']\n"
        "direction: {layer: 1, position: -1}\n")
    return load_model("hubby", conf, "test", "model")


def prepared_info(out: Path) -> dict:
    return json.loads((out / PREPARED).read_text())


# ------------------------------------------------------------------ prepare


def test_pinned_revision_prepares_offline_and_records_commit(conf_copy, hub_cache, tmp_path, no_network):
    spec = hub_spec(conf_copy)
    assert spec.source.revision == COMMIT
    out = tmp_path / "models" / "hubby"
    prepare(spec, out)
    info = prepared_info(out)
    assert info["revision"] == COMMIT and info["hub"] == REPO
    assert Path(info["load_from"]).resolve() == hub_cache.resolve()
    assert sorted(p.name for p in out.iterdir()) == [PREPARED]  # the weights stay in the cache
    assert no_network == []


def test_load_never_touches_the_network(conf_copy, hub_cache, tmp_path, no_network, monkeypatch, tiny_dirs):
    spec = hub_spec(conf_copy)
    out = tmp_path / "models" / "hubby"
    prepare(spec, out)
    # Make the hub libraries believe they are online: only load's own measures keep it local.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model, tok = load(spec, out, "cpu")
    assert no_network == []
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    # It is the cached model: same weights as the tiny model the snapshot was copied from.
    ref, _ = load(load_model("tiny-chat", conf_copy, "test", "model"), tiny_dirs["tiny-chat"], "cpu")
    ids = tok("<|im_start|>user\nhello<|im_end|>", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_unpinned_revision_records_the_commit_and_warns_once(conf_copy, hub_cache, tmp_path, no_network, caplog):
    spec = hub_spec(conf_copy, revision=None)
    out = tmp_path / "models" / "hubby"
    with caplog.at_level(logging.WARNING, logger=models.__name__):
        prepare(spec, out)
    assert prepared_info(out)["revision"] == COMMIT
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unpinned" in warnings[0] and "\n" not in warnings[0], warnings
    assert "model/hubby.yaml" in warnings[0] and COMMIT in warnings[0]


@pytest.mark.parametrize("revision, repo", [("f" * 40, REPO), ("v9.9", REPO), (COMMIT, "org/nope")])
def test_not_in_the_cache_offline_is_one_line_and_leaves_nothing(conf_copy, hub_cache, tmp_path, no_network,
                                                                 revision, repo):
    spec = hub_spec(conf_copy, revision=revision, repo=repo)
    out = tmp_path / "models" / "hubby"
    with pytest.raises(ConfigError) as info:
        prepare(spec, out)
    assert_one_line_error(info, "model/hubby.yaml", "source.hub")
    assert "not (fully) in the local hub cache" in str(info.value) and "cannot be reached" in str(info.value)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert no_network == []


def test_partial_snapshot_is_refused(conf_copy, hub_cache, tmp_path, no_network):
    for weights in hub_cache.glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "models" / "hubby"
    with pytest.raises(ConfigError) as info:
        prepare(hub_spec(conf_copy), out)
    assert_one_line_error(info, "model/hubby.yaml", "source.hub")
    assert "no weights" in str(info.value) and not out.exists()


def test_load_after_the_cache_was_cleaned_is_one_line(conf_copy, hub_cache, tmp_path, no_network):
    spec = hub_spec(conf_copy)
    out = tmp_path / "models" / "hubby"
    prepare(spec, out)
    shutil.rmtree(hub_cache)
    with pytest.raises(ConfigError) as info:
        load(spec, out, "cpu")
    assert_one_line_error(info, "model/hubby.yaml", "source.hub")
    assert "is gone" in str(info.value)


# ------------------------------------------------------------------ online paths, hub API faked


def fake_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def http_error(cls, status: int):
    httpx = pytest.importorskip("httpx2")
    request = httpx.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls("hub said no\nsecond line", response=httpx.Response(status, request=request))


def test_online_downloads_only_what_loading_needs(conf_copy, hub_cache, tmp_path, no_network, monkeypatch):
    fake_online(monkeypatch)
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "model.safetensors", "pytorch_model.bin", "model.gguf", "onnx/model.onnx",
             "original/consolidated.00.pth", "original/params.json", "README.md", ".gitattributes"]
    info = SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=f) for f in files])
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda self, repo, revision=None: info)
    calls = []
    real = huggingface_hub.snapshot_download

    def snapshot(repo, **kwargs):
        calls.append(kwargs)
        return real(repo, **{**kwargs, "local_files_only": True})  # the "download" is the cache

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    out = tmp_path / "models" / "hubby"
    prepare(hub_spec(conf_copy, revision="main"), out)
    (kwargs,) = calls
    assert kwargs["revision"] == COMMIT and not kwargs["local_files_only"]
    picked = set(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"],
                                     ignore_patterns=kwargs["ignore_patterns"]))
    assert picked == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "model.safetensors"}
    assert prepared_info(out)["revision"] == COMMIT
    assert no_network == []


def test_unreachable_hub_falls_back_to_the_cache(conf_copy, hub_cache, tmp_path, no_network, monkeypatch):
    fake_online(monkeypatch)
    out = tmp_path / "models" / "hubby"
    prepare(hub_spec(conf_copy, revision="main"), out)
    assert prepared_info(out)["revision"] == COMMIT
    assert no_network  # it did try the hub, got refused, and used the cache


@pytest.mark.parametrize("cls, status, words", [
    (hub_errors.RepositoryNotFoundError, 404, "has no model"),
    (hub_errors.RevisionNotFoundError, 404, "has no revision v9.9"),
    (hub_errors.GatedRepoError, 403, "gated"),
    (hub_errors.HfHubHTTPError, 401, "refused access"),
])
def test_unknown_repo_or_revision_online_is_one_line(conf_copy, hub_cache, tmp_path, no_network, monkeypatch,
                                                     cls, status, words):
    fake_online(monkeypatch)

    def repo_info(self, repo, revision=None):
        raise http_error(cls, status)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    out = tmp_path / "models" / "hubby"
    with pytest.raises(ConfigError) as info:
        prepare(hub_spec(conf_copy, revision="v9.9"), out)
    assert_one_line_error(info, "model/hubby.yaml", "source.hub")
    assert words in str(info.value) and not out.exists()


# ------------------------------------------------------------------ helpers


def test_patterns_fall_back_to_pytorch_bin_and_fetch_remote_code():
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "training_args.bin", "modeling_x.py", "qwen.tiktoken",
             "tokenizer_config.json", "model.gguf"]
    allow, ignore = hub_patterns(files, trust_remote_code=True)
    picked = set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))
    assert picked == set(files) - {"training_args.bin", "model.gguf"}
    allow, ignore = hub_patterns(files, trust_remote_code=False)
    assert "modeling_x.py" not in set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


def test_set_offline_turns_telemetry_off_in_every_job(monkeypatch, conf_copy, hub_cache):
    for var in ("HF_HUB_DISABLE_TELEMETRY", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    set_offline(hub_spec(conf_copy), fetch=True)  # preparing a hub model: may fetch, no telemetry
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1" and "HF_HUB_OFFLINE" not in os.environ
    set_offline()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
