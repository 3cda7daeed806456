"""Stage: search one intervention kind's continuous settings with Optuna (the experiment's `optimize` block).

Two objectives, both minimised: how many harmful val prompts the edited model still refuses (greedy, short
generations, scored by a phrase scorer) and the mean first-token KL(unedited || edited) on the harmless val
prompts. The sampler is Optuna's TPE, seeded; the study lives in a journal file,
results/<experiment>/optimize/<model>/study.journal, which is not a Snakemake output (Snakemake would delete
it with a failed job): a killed run resumes where it stopped, and several processes (local, or SLURM jobs on a
shared filesystem) can work on one study. Each process runs trials until the study holds `trials` complete
ones; processes that start a trial at the same moment may each finish theirs, so a shared study can end one
trial over per extra worker.

`python -m pipeline.optimize worker.json [--worker K]` runs a worker from a JSON file of `run`'s arguments: each
run writes its own as worker.json beside the journal, for extra workers to join with (the tests use it too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import torch

from .atomic import write_bytes, write_parquet, write_text
from .candidates import own_target
from .config import OptimizeSpec
from .decoding import generate
from .errors import ConfigError
from .figures import pyplot, to_png
from .interventions import INTERVENTIONS, Edit, Target
from .models import LoadedModel
from .probes import kl_divergence, last_logits, val_prompts
from .refusal_phrases import is_refusal
from .schemas import optimize_trials_schema
from .search_space import edit_for
from .specs import ModelSpec, ScorerSpec, from_params, to_params

JOURNAL = "study.journal"


@dataclass(frozen=True)
class Outputs:
    trials: str
    pareto: str
    front: str

    @property
    def journal(self) -> Path:
        """Beside the outputs: the study outlives the job that writes them."""
        return Path(self.trials).parent / JOURNAL


@dataclass
class Objective:
    """What one trial measures, with everything that does not depend on its settings computed once."""

    lm: LoadedModel
    target: Target
    harmful: list[str]
    harmless: list[str]
    baseline_logits: torch.Tensor  # the unedited model's next-token logits on `harmless`
    scorer: ScorerSpec
    max_new_tokens: int
    batch_size: int

    def measure(self, edit: Edit) -> tuple[int, int, float]:
        """(harmful prompts refused, how many, mean first-token KL on the harmless prompts) under `edit`."""
        edit.check(self.lm.rmap)
        with edit.weights(self.lm.hf, self.lm.device):  # a weight edit, undone after; a no-op for hook edits
            completions = generate(self.lm, self.harmful, edit, self.max_new_tokens, self.batch_size)
            logits = last_logits(self.lm, self.harmless, edit, self.batch_size)
        refusals = sum(is_refusal(c, self.scorer) for c in completions)
        kl = kl_divergence(self.baseline_logits, logits).mean().item()
        return refusals, len(completions), kl


def study_name(model: str, spec: OptimizeSpec) -> str:
    """The study's name in the journal: the model and a digest of what the trials' values depend on, so a
    changed range or scorer starts a new study (in the same file) while a changed trial count, or how many
    trials become grid cells (`generate`), resumes it."""
    what = {k: v for k, v in to_params(spec.settings).items()
            if k not in ("trials", "models", "batch_size", "generate")}
    what["scorer"] = to_params(spec.scorer)
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model}-{spec.settings.method}-{digest}"


def flock_lock(journal: Path):
    """The journal's write lock as an flock on a file beside it: the kernel drops it when its holder dies, so a
    worker killed mid-write (SIGKILL, a SLURM time limit) does not leave the others waiting out Optuna's own
    lock file's grace period (30 s a stale lock). flock works on local filesystems and NFSv4."""
    import fcntl

    class FlockLock:  # what JournalFileBackend calls: acquire and release (its base class is not public)
        def __init__(self, path: Path):
            self.path, self.fd = path, None

        def acquire(self) -> bool:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return True

        def release(self) -> None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    return FlockLock(journal.with_name(journal.name + ".lock"))


def open_study(journal: Path, name: str, seed: int):
    import optuna

    journal.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(journal), lock_obj=flock_lock(journal))
    storage = optuna.storages.JournalStorage(backend)
    sampler = optuna.samplers.TPESampler(seed=seed)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                               directions=["minimize", "minimize"])


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid recorded: not ours to judge
    return True


def fail_orphans(study) -> list[int]:
    """Mark FAIL the trials still RUNNING that a worker on this host started and that no live process holds
    (a SIGKILL, a node's time limit): Optuna's journal storage has no heartbeat to do it. Trials started on
    other hosts are left to the workers there, and so is one killed in the instant between its creation and
    its first attribute (it names no process)."""
    import optuna

    host = socket.gethostname()
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if t.user_attrs.get("host") == host and not pid_alive(t.user_attrs.get("pid"))]
    for number in orphans:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return orphans


def complete(study) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run(spec: ModelSpec, prepared_dir: str, prompts_path: str, selected_path: str, study: OptimizeSpec,
        outputs: Outputs, *, device: str, threads: int, exp_file: str, activations_path: str | None = None,
        worker: int = 0, max_trials: int | None = None) -> None:
    """Run trials until the study holds `trials` complete ones, or this worker has run `max_trials` of its own
    (an extra worker with a time budget, such as a SLURM job, takes a share rather than the rest)."""
    import optuna

    s = study.settings
    if INTERVENTIONS.get(s.method).reads_activations and activations_path is None:
        raise ConfigError(exp_file, "optimize.method", f"{s.method} needs the model's activations file")
    harmful, harmless = val_prompts(prompts_path)
    if not harmful or not harmless:
        raise ConfigError(exp_file, "split.val", "the optimize study scores trials on val prompts; set split.val")
    lm = LoadedModel(spec, prepared_dir, device, threads)
    objective = Objective(lm, own_target(selected_path, activations_path, s.method), harmful, harmless,
                          last_logits(lm, harmless, Edit(), s.batch_size), study.scorer, s.max_new_tokens,
                          s.batch_size)
    write_worker_file(spec, prepared_dir, prompts_path, selected_path, study, outputs, device, threads, exp_file,
                      activations_path)
    name = study_name(spec.name, study)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = open_study(outputs.journal, name, s.seed)
    # a resumed run or another worker must not replay the trials already drawn from the same seed
    opt = open_study(outputs.journal, name, s.seed + 1000 * worker + len(probe.get_trials(deepcopy=False)))

    fail_orphans(opt)

    def trial_values(trial) -> tuple[int, float]:
        started = time.monotonic()
        trial.set_user_attr("host", socket.gethostname())  # who holds the trial while it runs: fail_orphans
        trial.set_user_attr("pid", os.getpid())
        values = {**s.fixed, **{p: trial.suggest_float(p, low, high) for p, (low, high) in s.params.items()}}
        try:
            edit = edit_for(s.method, objective.target, values)
            refusals, n, kl = objective.measure(edit)
        except ValueError as err:  # a kernel position past the model's blocks, found once the model is known
            raise ConfigError(exp_file, "optimize.params", f"{s.method} of {spec.name}: {err}") from None
        trial.set_user_attr("n", n)
        trial.set_user_attr("duration", time.monotonic() - started)
        return refusals, kl

    ran = 0
    while complete(opt) < s.trials and (max_trials is None or ran < max_trials):
        opt.optimize(trial_values, n_trials=1, catch=())
        ran += 1
    write_outputs(opt, spec.name, s.method, list(s.params), outputs)


def write_worker_file(spec, prepared_dir, prompts_path, selected_path, study, outputs, device, threads, exp_file,
                      activations_path) -> None:
    """worker.json beside the journal: this run's arguments, so more workers can join the study
    (`python -m pipeline.optimize <folder>/worker.json --worker K`) without rebuilding them."""
    job = {"spec": to_params(spec), "prepared_dir": str(Path(prepared_dir).absolute()),
           "prompts": str(Path(prompts_path).absolute()), "selected": str(Path(selected_path).absolute()),
           "optimize": to_params(study), "outputs": {k: str(Path(v).absolute()) for k, v in vars(outputs).items()},
           "device": device, "threads": threads, "file": exp_file,
           "activations": str(Path(activations_path).absolute()) if activations_path else None}
    write_text(json.dumps(job, indent=1), outputs.journal.parent / "worker.json")


def trials_table(study, model: str, method: str, params: list[str], numbers: set[int] | None = None) -> pa.Table:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if numbers is not None and t.number not in numbers:
            continue
        done = t.values is not None
        rows.append({"model": model, "method": method, "number": t.number, "state": t.state.name,
                     **{p: t.params.get(p) for p in params},
                     "refusals": int(t.values[0]) if done else None, "n": t.user_attrs.get("n"),
                     "kl": float(t.values[1]) if done else None, "duration": t.user_attrs.get("duration")})
    return pa.Table.from_pylist(rows, schema=optimize_trials_schema(params))


def write_outputs(study, model: str, method: str, params: list[str], outputs: Outputs) -> None:
    front = {t.number for t in study.best_trials}
    table = trials_table(study, model, method, params)
    pareto = trials_table(study, model, method, params, front)
    write_parquet(table, outputs.trials)
    write_parquet(pareto, outputs.pareto)
    write_bytes(front_png(pl.from_arrow(table), pl.from_arrow(pareto), model, method), outputs.front)


def front_png(trials: pl.DataFrame, front: pl.DataFrame, model: str, method: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = trials.filter(pl.col("state") == "COMPLETE")
    ax.scatter(done["kl"], done["refusals"], s=18, c="0.6", label="trial")
    ordered = front.sort("kl")
    ax.plot(ordered["kl"], ordered["refusals"], "o-", c="tab:red", label="Pareto front")
    n = done["n"].max() if done.height else 0
    ax.set_xlabel("mean first-token KL on harmless val prompts")
    ax.set_ylabel(f"harmful val prompts refused (of {n})")
    ax.set_title(f"{model}: {method}, {done.height} trials")
    ax.legend()
    fig.tight_layout()
    return to_png(fig)


def main(argv: list[str] | None = None) -> None:
    """A worker from a JSON file: spec, prepared_dir, prompts, selected, optimize, outputs, device, threads, file
    (and activations for affine); `--worker K` seeds it apart from the others."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.optimize")
    parser.add_argument("job", help="JSON file of the run's arguments")
    parser.add_argument("--worker", type=int, default=0)
    parser.add_argument("--max-trials", type=int, default=None, help="run at most this many trials in this worker")
    args = parser.parse_args(argv)
    a = json.loads(Path(args.job).read_text())
    run(from_params(ModelSpec, a["spec"]), a["prepared_dir"], a["prompts"], a["selected"],
        from_params(OptimizeSpec, a["optimize"]), Outputs(**a["outputs"]), device=a.get("device", "cpu"),
        threads=a.get("threads", 1), exp_file=a.get("file", "-"), activations_path=a.get("activations"),
        worker=args.worker, max_trials=args.max_trials)


if __name__ == "__main__":
    main()
