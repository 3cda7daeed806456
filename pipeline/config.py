"""Compose the Hydra config, validate every YAML file against its typed schema, build the specs.

The top-level config (`conf/config.yaml`) is composed with Hydra's compose API so
command-line overrides work; the experiment then names models, templates,
datasets, an intervention set and one or more scorers, each one YAML file in its own group
folder. Each file is validated by a pydantic schema (below) that rejects unknown
keys, wrong types (a quoted "false" is not a boolean) and NaN or infinite numbers;
cross-references, files on disk and layer numbers (from the model's metadata, no
weights loaded) are checked next. Every problem is one `ConfigError` line naming
the file and the key, raised while the DAG is built, before any job runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from .checks import check_experiment
from .errors import ConfigError
from .experiment import Experiment
from .interventions import configurable, file_schema
from .interventions.addition import coefficient_problem
from .interventions.base import duplicate_name
from .paths import PROJECT_ROOT, resolve_data_path
from .registry import load_plugins
from .search_space import searchable, settings_problem
from .specs import (ChatQuestion, DatasetFile, DatasetSpec, InterventionSpec, Labels, Length,  # noqa: F401
                    LengthSpec, ModelFile, ModelSpec, ScorerSpec, ScoringFile, Sweep, SweepCell, SweepGenerate,
                    SweepSpec, TemplateFile, TemplateSpec, is_partner_source)
from .yamlschema import (LayerRange, Name, NegInt, NonNegFloat, NonNegInt, PosInt, Schema, Text,  # noqa: F401
                         validate)

if TYPE_CHECKING:
    from omegaconf import DictConfig

# omegaconf (and hydra) are imported where the config is composed: a job only reads the schemas (about
# 0.1 s of imports a job saves)

DEFAULT_CONF_DIR = PROJECT_ROOT / "conf"

# One set, or a pool of sets drawn as one (the direction paper trains on AdvBench +
# MaliciousInstruct + TDC2023).
DatasetNames = Name | Annotated[list[Name], Field(min_length=1)]


class SplitNames(Schema):
    train: DatasetNames
    val: DatasetNames | None = None
    test: DatasetNames | None = None
    # Sets no train or val prompt may repeat (the direction paper removes JailbreakBench, HarmBench
    # test and StrongREJECT from its train and val pools, though it tests on JailbreakBench alone).
    exclude: list[Name] = []


class Datasets(Schema):
    harmful: Name | SplitNames
    harmless: Name | SplitNames


class Split(Schema):
    """How each label's prompts are drawn (pipeline/prompts.py).

    `shuffle`: the project's own draw; each pool is shuffled with the seed and cut, the test set first.
    `train_test_split`: the base-models post's: one set per label cut by scikit-learn's
    `train_test_split(rows, test_size=test_fraction, random_state=seed)` (reproduced with numpy's
    seeded permutation, so scikit-learn is not a dependency); train (then val) are the first prompts
    of the kept part, test the first of the held-out part. `pool_cap`: each set of a pool of several
    contributes at most this many prompts, a seeded sample taken before pooling (the direction
    paper's 128 a source)."""

    mode: Literal["shuffle", "train_test_split"] = "shuffle"
    seed: NonNegInt
    train: PosInt
    val: NonNegInt = 0
    test: PosInt
    test_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    pool_cap: PosInt | None = None

    @model_validator(mode="after")
    def _mode_keys(self):
        if self.mode == "train_test_split" and self.test_fraction is None:
            raise PydanticCustomError("missing", "mode train_test_split needs the held-out fraction",
                                      {"key": "test_fraction"})
        if self.mode == "shuffle" and self.test_fraction is not None:
            raise PydanticCustomError("mode", "applies to mode train_test_split only", {"key": "test_fraction"})
        return self


class Activations(Schema):
    batch_size: PosInt = 16
    dtype: Literal["float16", "float32"] = "float16"


class Selection(Schema):
    """The selection rules' filters (pipeline/selection.py), and which candidates to evaluate (CPU budget)."""

    max_layer_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    kl_max: NonNegFloat = 0.1
    # other KL caps each rule's pick is also recorded for (selection.parquet `picks`: auto_kl0.4, ...), e.g. the
    # configured cap's neighbours, to see how far the cap moves the pick (and, with generate_picks, the rates)
    kl_max_compare: list[NonNegFloat] = []
    induce_min: float = 0.0
    induce_relative: bool = False  # induce_min counts from the unsteered harmless score, not from 0
    batch_size: PosInt = 32
    # COSMIC (direction.select: cosmic): the share of layers, least alike harmful vs harmless, it compares at
    cosmic_layer_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1
    layers: list[NonNegInt] | LayerRange | None = None  # None: every layer
    positions: list[NegInt] | None = None  # None: every post-instruction position

    def layer_set(self) -> tuple[int, ...] | None:
        return self.layers.layers() if isinstance(self.layers, LayerRange) else \
            (tuple(self.layers) if self.layers is not None else None)

    def evaluates(self, layer: int, position: int) -> bool:
        layers = self.layer_set()
        return (layers is None or layer in layers) and (self.positions is None or position in self.positions)


class Force(Schema):
    model: Name
    layer: NonNegInt
    position: NegInt = -1


class Bootstrap(Schema):
    """Selection stability (pipeline/stability.py): resample the train prompts `draws` times (seeded)
    and compare each draw's directions with the full data's; `reselect` also reruns selection on each
    draw (a selection job's forward passes per draw, so off unless an experiment asks)."""

    draws: PosInt = 5
    seed: NonNegInt = 0
    reselect: bool = False


class Direction(Schema):
    # how a candidate is made from a layer x position's activations: a name in
    # pipeline.direction_methods.DIRECTION_METHODS (built in, or registered by a plugin)
    method: Name = "mean_diff"
    # the method's own settings, checked against its Settings schema (e.g. winsorized: {quantile: 0.99})
    method_settings: dict[str, Any] = {}
    # other direction methods, each with its settings ({} for the defaults), made at the layer and position the
    # experiment selected, from the same train prompts: each is a grid source self-<method>, so the methods
    # share one table (e.g. {projected: {}, winsorized: {quantile: 0.99}})
    other_methods: dict[Name, dict[str, Any]] = {}
    sources: list[Literal["self", "random"]] = ["self", "random"]
    random_seed: NonNegInt = 0
    filter: bool = True  # keep harmful val/train prompts the model refuses, harmless ones it does not
    # auto: Arditi et al.'s rule; cosmic: Siu et al.'s (pipeline/selection.py SELECTORS); configured: the model YAML's
    select: Literal["auto", "cosmic", "configured"] = "auto"
    selection: Selection = Selection()
    # generate every rule's pick (at kl_max and at each kl_max_compare) as an ablation cell on the test prompts
    # (source `rule`), so the report shows what each selection rule's choice costs
    generate_picks: bool = False
    force: list[Force] = []
    bootstrap: Bootstrap | None = None  # None: no stability analysis


class Coherence(Schema):
    """A completion is broken when its repetition (fraction of repeated token 3-grams) passes
    `repetition_max`, or its loss under the unsteered model (nats/token; the lower of the loss after
    its own prompt and after a neutral instruction) passes `nll_max`; a generated cell (per label) is
    flagged degenerate when more than `broken_share_max` of its completions are broken
    (`coherence.degenerate_cells`). The losses are measured on the first `nll_prompts` test prompts
    of each label. Defaults: chosen on the labelled set (docs/measures.md)."""

    repetition_max: Annotated[float, Field(gt=0)] = 0.3
    nll_max: Annotated[float, Field(gt=0)] = 2.5
    broken_share_max: Annotated[float, Field(ge=0, lt=1)] = 0.25
    nll_prompts: NonNegInt = 16


class Capability(Schema):
    enabled: bool = True
    n: PosInt = 16
    reference: Text = "pkg:harmless_reference.jsonl"
    # kl_tokens: KL(baseline || steered) over this many answer positions, teacher-forced on the baseline's
    # own answer (1: first_token_kl again); positions past the end of a shorter answer are not counted.
    # Bounded: the job holds the baseline's logits at every position (n x kl_tokens x vocab floats)
    kl_tokens: Annotated[int, Field(ge=1, le=256)] = 8


class Generation(Schema):
    max_new_tokens: PosInt = 24
    batch_size: PosInt = 16
    # Cells of one model that share a generate job (the model loads once for all of them);
    # 1 gives every cell its own job, e.g. to spread a grid over many GPUs.
    cells_per_job: PosInt = 8
    # Cells of a job that generate in one pass, one nnsight invoke each over the same prompts
    # (batch_size prompts per cell, so a pass holds cells_per_pass x batch_size rows): on a GPU,
    # where decoding is bound by memory bandwidth, 8 cells cost little more than one.
    cells_per_pass: PosInt = 1
    # false: decode exactly max_new_tokens tokens, through EOS (the base-models post's fixed 16-token loop,
    # whose decoded text then also holds what the model wrote after its end of turn)
    stop_at_eos: bool = True


class Optimize(Schema):
    """A multi-objective search over one intervention kind's continuous settings (pipeline/optimize.py): Optuna's
    TPE sampler, seeded, minimising harmful refusals on the val prompts and the harmless first-token KL.
    `params`: dotted setting name -> [low, high] (pipeline/search_space.py names each kind's); `fixed`: settings
    held at one value (a kernel component needs all four of its settings, searched or fixed)."""

    method: Name = "kernel"
    params: Annotated[dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]], Field(min_length=1)]
    fixed: dict[str, float] = {}
    trials: PosInt = 50  # complete trials the study must hold: a rerun adds only the missing ones
    seed: NonNegInt = 0
    models: list[Name] | None = None  # None: every model of the experiment
    max_new_tokens: PosInt = 8  # a refusal shows in its first words; short generations keep a trial cheap
    scorer: Name | None = None  # a phrase scorer; None: the experiment's first
    batch_size: PosInt = 16
    # the study's first `generate` trials, generated as grid cells front1.. on the test prompts (picked on val):
    # the Pareto front from fewest harmful refusals up, then the other complete trials in the same order.
    # 0: none; above 0 the cells are part of `all`, so `all` runs the study
    generate: NonNegInt = 0


class OptimizeSpec(Schema):
    """The `optimize` block as validated: its models resolved (never None) and its scorer loaded."""

    settings: Optimize
    scorer: ScorerSpec


class Pair(Schema):
    base: Name
    chat: Name


class ExperimentFile(Schema):
    name: Name
    models: Annotated[list[Name], Field(min_length=1)]
    pairs: list[Pair] = []
    datasets: Datasets
    split: Split
    activations: Activations = Activations()
    direction: Direction = Direction()
    interventions: Name
    # one scorer, or several scored side by side (each completion gets one row per scorer)
    scoring: Name | Annotated[list[Name], Field(min_length=1)]
    sweep: Sweep | None = None
    coherence: Coherence = Coherence()
    capability: Capability = Capability()
    generation: Generation = Generation()
    length: Length | None = None
    optimize: Optimize | None = None  # `snakemake optimize`: not part of `all`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: PosInt = 2
    # Your own methods: Python files (relative to the conf folder) or importable module names, each
    # registering an intervention kind or a direction method (pipeline.registry); loaded before the
    # intervention file is read, and by every job that looks a method up.
    plugins: list[Text] = []


class TopLevel(Schema):
    """conf/config.yaml after composition: `+key=value` overrides land here too."""

    experiment: dict | None = None
    results_dir: Text = "results"


# --------------------------------------------------------------------------- loading


def compose(overrides: list[str] | None = None, conf_dir: Path | str | None = None) -> tuple[DictConfig, str]:
    """Compose conf/config.yaml with Hydra overrides; return (config, experiment choice)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR).resolve()
    if not (conf_dir / "config.yaml").exists():
        raise ConfigError(conf_dir / "config.yaml", "-", "missing top-level config file")
    overrides = list(overrides or [])
    _check_override_syntax(overrides, _rel(conf_dir / "config.yaml", conf_dir))
    # Hydra reports a broken YAML file without naming it: parse the files it will read first
    _composed_files(conf_dir, overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        first = " ".join(str(e).strip().split("\n", 2)[:2])  # Hydra's reason is often on its second line
        raise ConfigError(_rel(conf_dir / "config.yaml", conf_dir), "overrides", first) from None
    finally:
        GlobalHydra.instance().clear()
    choice = cfg.hydra.runtime.choices.get("experiment")
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    return OmegaConf.create(with_hydra), choice


def load_experiment(overrides: list[str] | None = None, conf_dir: Path | str | None = None,
                    results_dir: Path | str | None = None, check_models: bool = True,
                    device_here: bool = True) -> Experiment:
    """The whole experiment, validated. `check_models`: also check files, prompt sets and layers on disk;
    `device_here`: jobs run on this machine (not a cluster), so a requested GPU must be visible here."""
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR).resolve()
    cfg, choice = compose(overrides, conf_dir)
    top_file = _rel(conf_dir / "config.yaml", conf_dir)
    exp_file = _rel(conf_dir / "experiment" / f"{choice}.yaml", conf_dir)
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # interpolation errors
        raise ConfigError(exp_file, "-", f"cannot resolve: {str(err).splitlines()[0]}") from None
    top = validate(TopLevel, data, top_file)
    if top.experiment is None:
        raise ConfigError(top_file, "experiment", "no experiment selected")
    e = validate(ExperimentFile, top.experiment, exp_file)
    plugins = resolve_plugins(e.plugins, conf_dir, exp_file)
    root = Path(results_dir or top.results_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(top_file, "results_dir", f"'{root}' exists and is not a folder")
    exp = build_experiment(e, exp_file, conf_dir, root, plugins)
    if check_models:
        check_results_dir(root, top_file)
        check_experiment(exp, device_here)
    return exp


def check_pairs(pairs: list[Pair], models: dict[str, ModelSpec], exp_file: str) -> None:
    """Each pair: two different models of the experiment, a base and a chat model as their YAMLs' `role`
    says, declared once (either way round); anything else plans cells that mean nothing or collide."""
    seen = {}
    for i, p in enumerate(pairs):
        for side in ("base", "chat"):
            name = getattr(p, side)
            if name not in models:
                raise ConfigError(exp_file, f"pairs[{i}].{side}", f"model '{name}' is not in this experiment's models")
        if p.base == p.chat:
            raise ConfigError(exp_file, f"pairs[{i}].chat", f"'{p.chat}' is also the pair's base: a model paired "
                              "with itself would steer it with its own direction twice (the `self` cells already do)")
        for side in ("base", "chat"):
            spec = models[getattr(p, side)]
            if spec.role != side:
                raise ConfigError(exp_file, f"pairs[{i}].{side}", f"'{spec.name}' has role '{spec.role}' in "
                                  f"{spec.file}, not '{side}': swap the pair's sides or fix the model's role")
        key = frozenset((p.base, p.chat))
        if key in seen:
            raise ConfigError(exp_file, f"pairs[{i}]", f"{p.base} / {p.chat} is declared twice (pairs[{seen[key]}])")
        seen[key] = i


def check_results_dir(root: Path, top_file: str) -> None:
    """The results folder can be created and written: found now, not when Snakemake makes the first output.
    Tried for real (a temp folder made and removed in the nearest existing folder), since permission bits
    say nothing of read-only mounts or /proc."""
    import tempfile

    path = root.absolute()
    for part in [path, *path.parents]:
        if part.is_symlink() and not part.exists():
            raise ConfigError(top_file, "results_dir", f"'{part}' is a symbolic link to a missing target "
                              f"({os.readlink(part)})")
        if part.exists():
            if not part.is_dir():
                raise ConfigError(top_file, "results_dir", f"'{part}' is not a folder")
            try:
                os.rmdir(tempfile.mkdtemp(dir=part, prefix=".results-check-"))
            except OSError as err:
                raise ConfigError(top_file, "results_dir", f"cannot create '{root}': '{part}' is not writable "
                                  f"({err.strerror})") from None
            return


def resolve_plugins(entries: list[str], conf_dir: Path, exp_file: str) -> tuple[str, ...]:
    """Each plugin loaded (so its methods are registered before any YAML names them), as jobs will load
    it: a file as its absolute path, a module by name. A plugin that fails to import is one line."""
    resolved = []
    for i, entry in enumerate(entries):
        if entry.endswith(".py"):
            path = (conf_dir / entry).resolve()
            if not path.is_file():
                raise ConfigError(exp_file, f"plugins[{i}]", f"file not found: {path}")
            entry = str(path)
        try:
            load_plugins([entry])
        except Exception as err:  # the plugin's own code: any error is the plugin's
            raise ConfigError(exp_file, f"plugins[{i}]", f"cannot load {entry}: {type(err).__name__}: {err}") from None
        resolved.append(entry)
    return tuple(resolved)


def check_direction_method(direction: Direction, exp_file: str) -> Direction:
    """`direction.method` names a registered method (plugins are loaded by now) and `direction.method_settings`
    are its settings: `direction` with them validated, defaults filled in (so the rules' params name them)."""
    from .direction_methods import DIRECTION_METHODS, method, settings_of

    if direction.method not in DIRECTION_METHODS:
        raise ConfigError(exp_file, "direction.method", f"unknown direction method '{direction.method}' "
                          f"(known: {', '.join(DIRECTION_METHODS.names())}); a method of your own is a plugin "
                          "that registers it (plugins:)")
    settings = settings_of(method(direction.method, direction.method_settings, exp_file))
    others = {}
    for name, given in direction.other_methods.items():
        key = f"direction.other_methods.{name}"
        if name not in DIRECTION_METHODS:
            raise ConfigError(exp_file, key, f"unknown direction method '{name}' "
                              f"(known: {', '.join(DIRECTION_METHODS.names())})")
        others[name] = settings_of(method(name, given, exp_file, key=key))
        if (name, others[name]) == (direction.method, settings):
            raise ConfigError(exp_file, key, f"'{name}' with these settings is direction.method already (source self)")
    return direction.model_copy(update={"method_settings": settings, "other_methods": others})


def build_experiment(e: ExperimentFile, exp_file: str, conf_dir: Path, results_dir: Path,
                     plugins: tuple[str, ...] = ()) -> Experiment:
    models = {m: load_model(m, conf_dir, exp_file, f"models[{i}]") for i, m in enumerate(e.models)}
    for i, m in enumerate(e.models):
        if e.models.index(m) != i:
            raise ConfigError(exp_file, f"models[{i}]", f"model '{m}' is listed twice")
        if not is_partner_source(m):  # a paired model's name is its direction's source in the grid's paths
            raise ConfigError(exp_file, f"models[{i}]", f"model name '{m}' reads as a direction source (self, "
                              "random, self-<method>, ...); rename the model's YAML file")
    check_pairs(e.pairs, models, exp_file)
    direction = check_direction_method(e.direction, exp_file)
    for i, f in enumerate(e.direction.force):
        if f.model not in models:
            raise ConfigError(exp_file, f"direction.force[{i}].model",
                              f"model '{f.model}' is not in this experiment's models")
    exp = Experiment(
        name=e.name, file=exp_file, results_dir=results_dir, models=models, plugins=plugins,
        pairs=[(p.base, p.chat) for p in e.pairs],
        dataset_splits=load_dataset_splits(e.datasets, conf_dir, exp_file, e.split), split=e.split,
        activations=e.activations, direction=direction,
        intervention=load_intervention(e.interventions, conf_dir, exp_file),
        scorers=load_scorers(e.scoring, conf_dir, exp_file), generation=e.generation,
        capability=e.capability, coherence=e.coherence, device=e.device, threads=e.threads,
        sweep=load_sweep(e.sweep, exp_file, models),
        length=load_length(e.length, e.generation, e.scoring, exp_file, conf_dir),
        optimize=load_optimize(e.optimize, e.scoring, exp_file, conf_dir, models),
    )
    if e.sweep is not None and e.sweep.enabled:
        check_sweep_magnitudes(e.sweep, exp.intervention["addition"].normalize, exp_file, exp.intervention.file)
    if exp.capability.enabled and not resolve_data_path(exp.capability.reference).exists():
        raise ConfigError(exp_file, "capability.reference", f"file not found: {exp.capability.reference}")
    if exp.sweep is not None and e.split.val == 0:
        raise ConfigError(exp_file, "split.val", "the sweep scores cells on val prompts; set split.val")
    auto = [m for m in models if not exp.direction_choice(m)[2]]
    if auto and e.split.val == 0:
        raise ConfigError(exp_file, "split.val", f"automatic direction selection ({', '.join(auto)}) needs val "
                          "prompts; set split.val or force the direction in the model YAML")
    for m in models:
        layer, _, forced = exp.direction_choice(m)
        if forced and layer is None:
            raise ConfigError(models[m].file, "direction.layer",
                              "missing: the direction is forced or configured, so it needs its layer")
    return exp


def load_dataset_splits(ds: Datasets, conf_dir: Path, exp_file: str,
                        split: Split | None = None) -> dict[str, dict[str, tuple[DatasetSpec, ...]]]:
    """`harmful: advbench` (one set, split three ways), `harmful: {train: advbench, test: jbb-harmful}`
    or a pool per split, `train: [advbench, malicious-instruct, tdc2023]`; `exclude` (sets no train or
    val prompt may repeat) comes as a fourth entry."""
    splits = {}
    for label in ("harmful", "harmless"):
        value = getattr(ds, label)
        names = {"train": value, "val": value, "test": value} if isinstance(value, str) else \
            {"train": value.train, "val": value.val or value.train, "test": value.test or value.train}
        if split is not None and split.mode == "train_test_split":
            one = {n if isinstance(n, str) else tuple(n) for n in names.values()}
            if len(one) != 1 or not isinstance(next(iter(one)), str):
                raise ConfigError(exp_file, f"datasets.{label}", "split mode train_test_split cuts one set per "
                                  "label into train and held-out parts: name one set for train, val and test")
        if not isinstance(value, str) and value.exclude:
            names["exclude"] = value.exclude
        loaded: dict[str, DatasetSpec] = {}
        by_split = {}
        for part, pool in names.items():
            pool = [pool] if isinstance(pool, str) else pool
            if len(set(pool)) != len(pool):
                raise ConfigError(exp_file, f"datasets.{label}.{part}", "names a set twice")
            for i, name in enumerate(pool):
                key = f"datasets.{label}" if isinstance(value, str) else \
                    f"datasets.{label}.{part}" + (f"[{i}]" if len(pool) > 1 else "")
                if name not in loaded:
                    loaded[name] = load_dataset_spec(name, label, conf_dir, exp_file, key)
            by_split[part] = tuple(loaded[name] for name in pool)
        drawn = {spec for part in ("train", "val") for spec in by_split[part]}
        for i, spec in enumerate(by_split.get("exclude", ())):
            name = spec.name
            if spec in drawn:
                raise ConfigError(exp_file, f"datasets.{label}.exclude[{i}]",
                                  f"'{name}' is drawn from for train or val; excluding it would empty that split")
        splits[label] = by_split
    return splits


def load_intervention(name: str, conf_dir: Path, ref_file: str) -> InterventionSpec:
    """An intervention YAML: one key per registered kind (plugins included), each by its kind's schema."""
    file, data = _load_group(conf_dir, "intervention", name, ref_file, "interventions")
    iv = validate(file_schema(), data, file)
    return InterventionSpec(file=file, values={k.name: getattr(iv, k.name) for k in configurable()})


def _distinct_names(coefficients: list[float], file: str, key: str) -> None:
    """Coefficients name files (`addition_2`): two that format alike would be one file written twice."""
    clash = duplicate_name(coefficients)
    if clash:
        i, j, name = clash
        c = coefficients[i]
        same = "is listed twice" if coefficients[j] == c else f"formats to the same name '{name}' as {key}[{j}]"
        raise ConfigError(file, f"{key}[{i}]", f"{c!r} {same}; give distinct values")


def check_sweep_magnitudes(d: Sweep, normalize: bool, file: str, iv_file: str) -> None:
    """Sweep coefficients within `MAX_COEFFICIENT`: the intervention file's normalize says what they multiply."""
    keyed = [(f"sweep.coefficients[{i}]", c) for i, c in enumerate(d.coefficients)]
    keyed += [(f"sweep.generate.cells[{i}].coefficient", c.coefficient) for i, c in enumerate(d.generate.cells)]
    for key, c in keyed:
        problem = coefficient_problem(c, normalize)
        if problem:
            raise ConfigError(file, key, f"{problem} (normalize: addition.normalize of {iv_file})")


def load_sweep(d: Sweep | None, file: str, models: dict) -> SweepSpec | None:
    if d is None or not d.enabled:
        return None
    _distinct_names(d.coefficients, file, "sweep.coefficients")
    for i, c in enumerate(d.generate.cells):
        if d.generate.cells.index(c) != i:
            raise ConfigError(file, f"sweep.generate.cells[{i}]", "the same cell is listed twice")
    names = list(d.models) if d.models is not None else list(models)
    for i, m in enumerate(names):
        if m not in models:
            raise ConfigError(file, f"sweep.models[{i}]", f"model '{m}' is not in this experiment's models")
    return SweepSpec(settings=d.model_copy(update={"models": names}))


def load_optimize(d: Optimize | None, scoring: str | list[str], file: str, conf_dir: Path,
                  models: dict) -> OptimizeSpec | None:
    """The `optimize` block checked against its kind's searchable settings, its models and its scorer."""
    if d is None:
        return None
    known = searchable()
    if d.method not in known:
        raise ConfigError(file, "optimize.method", f"'{d.method}' has no searchable settings (searchable kinds: "
                          f"{', '.join(known)})")
    names = known[d.method]
    for group in ("params", "fixed"):
        for name in getattr(d, group):
            if name not in names:
                raise ConfigError(file, f"optimize.{group}.{name}", f"not a setting of {d.method} (known: "
                                  f"{', '.join(names)})")
    for name, (low, high) in d.params.items():
        if not low < high:
            raise ConfigError(file, f"optimize.params.{name}", f"needs low < high, got [{low:g}, {high:g}]")
        if name in d.fixed:
            raise ConfigError(file, f"optimize.fixed.{name}", "is also searched in optimize.params; give it once")
    for corner in (0, 1):  # each setting is bounded on its own, so the box's corners fail where any point would
        problem = settings_problem(d.method, {**d.fixed, **{n: b[corner] for n, b in d.params.items()}})
        if problem:
            raise ConfigError(file, "optimize.params", f"{d.method} {problem} (at the "
                              f"{'low' if corner == 0 else 'high'} end of the ranges; missing ones go in fixed)")
    if d.generate > d.trials:
        raise ConfigError(file, "optimize.generate", f"asks for {d.generate} trials generated of a study of "
                          f"{d.trials} (optimize.trials)")
    names_m = list(d.models) if d.models is not None else list(models)
    for i, m in enumerate(names_m):
        if m not in models:
            raise ConfigError(file, f"optimize.models[{i}]", f"model '{m}' is not in this experiment's models")
    name = d.scorer or (scoring if isinstance(scoring, str) else scoring[0])
    scorer = load_scorer(name, conf_dir, file, "optimize.scorer")
    if scorer.kind == "judge":
        raise ConfigError(file, "optimize.scorer", f"'{name}' is a judge; a trial scores its completions with a "
                          "phrase scorer (prefix or substring): name one here")
    return OptimizeSpec(settings=d.model_copy(update={"models": names_m}), scorer=scorer)


def load_scorers(scoring: str | list[str], conf_dir: Path, exp_file: str) -> tuple[ScorerSpec, ...]:
    """`scoring: name` or `scoring: [name, ...]`: each a file in conf/scoring/, none listed twice."""
    if isinstance(scoring, str):
        return (load_scorer(scoring, conf_dir, exp_file),)
    scorers = []
    for i, name in enumerate(scoring):
        if scoring.index(name) != i:
            raise ConfigError(exp_file, f"scoring[{i}]", f"scorer '{name}' is listed twice")
        scorers.append(load_scorer(name, conf_dir, exp_file, f"scoring[{i}]"))
    return tuple(scorers)


def load_length(d: Length | None, generation: Generation, scoring: str | list[str], file: str,
                conf_dir: Path) -> LengthSpec | None:
    if d is None:
        return None
    for i, k in enumerate(d.tokens):
        if k > generation.max_new_tokens:
            raise ConfigError(file, f"length.tokens[{i}]", f"{k} exceeds generation.max_new_tokens "
                              f"({generation.max_new_tokens}): completions are generated once, at the longest length")
        if d.tokens.index(k) != i:
            raise ConfigError(file, f"length.tokens[{i}]", f"{k} is listed twice")
    names = d.scorers if d.scorers is not None else ([scoring] if isinstance(scoring, str) else list(scoring))
    loaded = []
    for i, name in enumerate(names):
        key = f"length.scorers[{i}]" if d.scorers is not None else "length.scorers"
        if names.index(name) != i:
            raise ConfigError(file, key, f"scorer '{name}' is listed twice")
        loaded.append((key, load_scorer(name, conf_dir, file, key)))
    # by default the experiment's phrase scorers; a judge named here, or an experiment scored by judges alone, stops
    judged = [(key, s) for key, s in loaded if s.kind == "judge"]
    scorers = [s for _, s in loaded if s.kind != "judge"]
    if judged and (d.scorers is not None or not scorers):
        key, judge = judged[0]
        raise ConfigError(file, key, f"'{judge.name}' is a judge; the length stage rescores every completion "
                          "at every length with phrase scorers only (list prefix/substring scorers here)")
    return LengthSpec(settings=d, scorers=tuple(scorers))


def load_model(name: str, conf_dir: Path, ref_file: str, ref_key: str) -> ModelSpec:
    file, data = _load_group(conf_dir, "model", name, ref_file, ref_key)
    m = validate(ModelFile, data, file)
    _check_chat_template(m.chat_template, file)
    return ModelSpec(**{**dict(m), "template": load_template(m.template, conf_dir, file)}, name=name, file=file)


def _check_chat_template(text: str | None, file: str) -> None:
    """A model YAML's Jinja chat template, parsed once here so a syntax error is one line before any job."""
    if text is not None:
        import jinja2

        try:
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(file, "chat_template", f"not a valid Jinja template (line {err.lineno}: "
                              f"{err.message})") from None


def load_template(name: str, conf_dir: Path, ref_file: str) -> TemplateSpec:
    file, data = _load_group(conf_dir, "template", name, ref_file, "template")
    return TemplateSpec(**dict(validate(TemplateFile, data, file)), name=name)


def load_dataset_spec(name: str, label: str, conf_dir: Path, ref_file: str, ref_key: str) -> DatasetSpec:
    file, data = _load_group(conf_dir, "dataset", name, ref_file, ref_key)
    d = validate(DatasetFile, data, file)
    path = d.path
    if path is not None:
        resolved = resolve_data_path(path)
        if not resolved.is_file():
            raise ConfigError(file, "path", f"file not found: {path}")
        path = str(resolved)
    return DatasetSpec.model_validate({**d.model_dump(), "path": path, "name": name, "file": file, "label": label})


def load_scorer(name: str, conf_dir: Path, ref_file: str, ref_key: str = "scoring") -> ScorerSpec:
    file, data = _load_group(conf_dir, "scoring", name, ref_file, ref_key)
    s = validate(ScoringFile, data, file)
    judge = load_model(s.model, conf_dir, file, "model") if s.kind == "judge" else None
    return ScorerSpec(**dict(s), name=name, judge=judge)


def _load_group(conf_dir: Path, group: str, name: str, ref_file: str, ref_key: str) -> tuple[str, dict]:
    from omegaconf import OmegaConf

    path = conf_dir / group / f"{name}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(ref_file, ref_key,
                          f"unknown {group} '{name}' (no conf/{group}/{name}.yaml; available: {', '.join(avail)})")
    file = _rel(path, conf_dir)
    data = read_yaml(path, conf_dir)  # one line naming the line of a parse error
    if isinstance(data, dict):
        try:  # OmegaConf's own loader, for its reading of numbers (1e6 is a float) and interpolations
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as err:
            raise ConfigError(file, "-", f"cannot resolve: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(file, "-", f"must be a mapping of keys to values, not a {_yaml_kind(data)}")
    return file, data


def read_yaml(path: Path, conf_dir: Path) -> Any:
    """A config file's YAML, or one ConfigError naming the file and the line (bad UTF-8, tabs, unclosed
    brackets, ...): what YAML's own message leaves out."""
    import yaml

    file = _rel(path, conf_dir)
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(file, "-", f"line {line}: not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as "
                          "UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        tab = " (YAML indents with spaces, not tabs)" if "\t" in (text.splitlines()[mark.line]
                                                                 if mark and mark.line < len(text.splitlines())
                                                                 else "") else ""
        opened = err.context_mark
        started = (f" ({err.context} that starts on line {opened.line + 1})"
                   if err.context and opened and mark and opened.line != mark.line else "")
        raise ConfigError(file, "-", f"{where}not valid YAML: {err.problem or err.context}{started}{tab}") from None
    except yaml.YAMLError as err:
        raise ConfigError(file, "-", f"not valid YAML: {str(err).strip().splitlines()[0]}") from None


def _yaml_kind(data: Any) -> str:
    return {list: "list", str: "string", type(None): "empty file"}.get(type(data), type(data).__name__)


def _composed_files(conf_dir: Path, overrides: list[str]) -> list[Path]:
    """The YAML files Hydra composes: conf/config.yaml and the experiment it selects (the override's, or the
    default named in config.yaml; an unknown one is left to Hydra's own message)."""
    files = [conf_dir / "config.yaml"]
    top = read_yaml(files[0], conf_dir)
    if not isinstance(top, dict):
        raise ConfigError(_rel(files[0], conf_dir), "-", f"must be a mapping of keys to values, not a "
                          f"{_yaml_kind(top)}")
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "experiment" and "=" in o]
    if not chosen:
        defaults = top.get("defaults", [])
        chosen = [d["experiment"] for d in defaults if isinstance(d, dict) and isinstance(d.get("experiment"), str)]
    for name in chosen[-1:]:
        path = conf_dir / "experiment" / f"{name}.yaml"
        if path.is_file():
            files.append(path)
            data = read_yaml(path, conf_dir)
            if not isinstance(data, dict):
                raise ConfigError(_rel(path, conf_dir), "-", f"must be a mapping of keys to values, not a "
                                  f"{_yaml_kind(data)}")
    return files


def _check_override_syntax(overrides: list[str], top_file: str) -> None:
    """Each override parsed as Hydra will, so one that cannot be is one line saying how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except (OverrideParseException, HydraException):
            raise ConfigError(top_file, "overrides", f"cannot parse the override {override!r}: write key=value; "
                              "quote a value with spaces or special characters in single quotes inside the "
                              "overrides string (--config overrides=\"experiment.name='my run'\"), and pass "
                              "booleans and numbers unquoted (key=false, not key='false')") from None


def _rel(path: Path, conf_dir: Path) -> str:
    """A config file's name as users see it: conf/<group>/<name>.yaml."""
    conf_dir = Path(conf_dir).resolve()  # callers may reach conf/ through a symlink
    return str(Path(conf_dir.name) / Path(path).resolve().relative_to(conf_dir))
