import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.config import DEFAULT_CONF_DIR, load_experiment, load_model  # noqa: E402
from pipeline.models import LoadedModel, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny_spec(name: str):
    return load_model(name, DEFAULT_CONF_DIR, "test", "model")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """The two tiny random models of conf/model/, prepared once per test session."""
    base = tmp_path_factory.mktemp("models")
    dirs = {}
    for name in ("tiny-chat", "tiny-base"):
        prepare(tiny_spec(name), base / name)
        dirs[name] = base / name
    return dirs


@pytest.fixture(scope="session", params=["tiny-chat", "tiny-base"])
def tiny(request, tiny_dirs):
    return LoadedModel(tiny_spec(request.param), tiny_dirs[request.param], device="cpu", threads=2)


@pytest.fixture(scope="session")
def tiny_chat(tiny_dirs):
    return LoadedModel(tiny_spec("tiny-chat"), tiny_dirs["tiny-chat"], device="cpu", threads=2)


@pytest.fixture()
def tiny_experiment():
    return load_experiment(["experiment=tiny"])


@pytest.fixture()
def conf_copy(tmp_path):
    """A private copy of conf/ a test may add files to."""
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    return conf


def assert_one_line_error(err, file_part: str, key: str) -> None:
    """A ConfigError names the file and the key, on one line."""
    text = str(err.value)
    assert file_part in text and f"key '{key}'" in text and "\n" not in text, text
