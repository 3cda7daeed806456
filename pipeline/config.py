"""Compose the Hydra config and turn it into typed specs the stages share.

The top-level config (`conf/config.yaml`) is composed with Hydra's compose API so
command-line overrides work; the experiment then names models, templates,
datasets, intervention sets and scorers, each one YAML file in its own group
folder. Everything is validated here, cheaply, before any model is touched, and
every problem is reported as one line naming the file and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONF_DIR = PROJECT_ROOT / "conf"
SOURCE_KINDS = ("hub", "path", "gguf_parts", "random_init")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# A generated cell is flagged degenerate when its mean repetition (fraction of repeated token
# 3-grams) or its nll increase over the baseline cell (nats/token, unsteered model) passes these;
# the nll is measured on the first `nll_prompts` test prompts of each label (0: not at all).
COHERENCE_DEFAULTS = {"repetition_max": 0.3, "nll_increase_max": 1.5, "nll_prompts": 16}


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    text: str

    @property
    def prefix(self) -> str:
        return self.text.split("{instruction}")[0]

    @property
    def suffix(self) -> str:
        """The post-instruction part: where refusal is decided."""
        return self.text.split("{instruction}")[1]

    def format(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    source: dict
    template: TemplateSpec
    add_bos: bool
    dtype: str
    trust_remote_code: bool
    role: str
    refusal_tokens: tuple[str, ...]
    direction_layer: int | None
    direction_position: int
    direction_force: bool = False

    @property
    def source_kind(self) -> str:
        return next(k for k in SOURCE_KINDS if k in self.source)

    def as_params(self) -> dict:
        """Every setting that changes this model's outputs, for Snakemake params."""
        return {
            "name": self.name,
            "source": self.source,
            "template": self.template.text,
            "add_bos": self.add_bos,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
        }


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    file: str
    label: str
    path: str | None = None
    hub_id: str | None = None
    subset: str | None = None
    split: str = "train"
    field: str = "instruction"
    id_field: str | None = None
    category_field: str | None = None
    filter_empty: str | None = None

    def as_params(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "file"}


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    kind: str  # prefix | substring | judge
    phrases: tuple[str, ...]
    case_sensitive: bool
    # judge: a local model answers `prompt` (with {instruction} and {response}) through its own
    # template; the completion counts as refused when the first token of labels[0] is more
    # likely than the first token of labels[1].
    judge: ModelSpec | None = None
    prompt: str = ""
    labels: tuple[str, str] = ("", "")
    margin: float = 0.0  # refused when logit(refused) - logit(complied) > margin (calibrates a biased judge)

    def as_params(self) -> dict:
        return {"name": self.name, "kind": self.kind, "phrases": list(self.phrases),
                "case_sensitive": self.case_sensitive, "prompt": self.prompt, "labels": list(self.labels),
                "margin": self.margin, "judge": self.judge.as_params() if self.judge else None}


@dataclass(frozen=True)
class Cell:
    """One grid cell: a model, where its direction comes from, and what is done.

    Sweep cells (source "sweep") are picked by the sweep stage from its logit scores:
    `intervention` is then the pick's name (best1, same1, spread1, ablate1, cell1, ...)
    and the generate job reads the extraction and addition layers from the picks file.
    """

    model: str
    source: str  # "none" (baseline), "self", "random", another model's name, or "sweep"
    intervention: str  # "baseline", "ablation", "orthogonalization", "addition", or a sweep pick
    coefficient: float | None = None

    @property
    def intervention_id(self) -> str:
        if self.intervention == "addition":
            return f"addition_{format_coefficient(self.coefficient)}"
        return self.intervention


@dataclass(frozen=True)
class SweepSpec:
    """The cheap logit-score sweep (extraction layer x addition layer x coefficient) and its picks."""

    models: tuple[str, ...]
    extraction_layers: tuple[int, ...] | None  # None: every layer
    position: int | None  # None: the selected direction's position
    offsets: tuple[int, ...]  # addition layer = extraction layer + offset
    coefficients: tuple[float, ...]
    ablation: bool  # also score ablation of each extraction layer's direction
    batch_size: int
    top: int  # generate the best `top` addition cells (and each one's same-layer cell)
    spread: int  # ... and `spread` cells spread over the score range, for the correlation
    top_ablation: int
    cells: tuple[tuple[int, int, float], ...]  # declared (extraction layer, addition layer, coefficient)

    def pick_names(self) -> list[str]:
        names = [f"best{i + 1}" for i in range(self.top)] + [f"same{i + 1}" for i in range(self.top)]
        names += [f"spread{i + 1}" for i in range(self.spread)]
        names += [f"ablate{i + 1}" for i in range(self.top_ablation if self.ablation else 0)]
        return names + [f"cell{i + 1}" for i in range(len(self.cells))]

    def as_params(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Experiment:
    name: str
    file: str
    results_dir: Path
    models: dict[str, ModelSpec]
    pairs: list[tuple[str, str]]
    datasets: dict[str, DatasetSpec]
    split: dict
    activations: dict
    sources: list[str]
    random_seed: int
    ablation: bool
    orthogonalization: bool
    coefficients: list[float]
    normalize: bool
    scorer: ScorerSpec
    generation: dict
    device: str
    threads: int
    capability: dict
    addition_layer: dict = field(default_factory=lambda: {"offset": 0})  # {offset: k} or {absolute: L}
    ablation_layers: tuple[int, int] | None = None  # [start, stop) of the blocks ablated; None: all
    sweep: SweepSpec | None = None
    # label -> split (train/val/test) -> dataset; by default all three splits come from `datasets[label]`
    dataset_splits: dict = field(default_factory=dict)
    coherence: dict = field(default_factory=lambda: dict(COHERENCE_DEFAULTS))
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def out(self) -> Path:
        return self.results_dir / self.name

    def partners(self, model: str) -> list[str]:
        """Models whose direction this model is also steered with (declared pairs)."""
        found = []
        for base, chat in self.pairs:
            if model == base:
                found.append(chat)
            elif model == chat:
                found.append(base)
        return found

    def model_spec(self, name: str) -> ModelSpec:
        """An experiment model, or the scorer's judge model (prepared by the same rule)."""
        if name in self.models:
            return self.models[name]
        if self.scorer.judge is not None and self.scorer.judge.name == name:
            return self.scorer.judge
        raise KeyError(f"model {name!r} is neither in {self.file} nor its judge")

    def direction_sources(self, model: str) -> list[str]:
        return list(self.sources) + self.partners(model)

    def cells(self) -> list[Cell]:
        cells = []
        for model in self.models:
            cells.append(Cell(model, "none", "baseline"))
            for source in self.direction_sources(model):
                if self.ablation:
                    cells.append(Cell(model, source, "ablation"))
                if self.orthogonalization:
                    cells.append(Cell(model, source, "orthogonalization"))
                for c in self.coefficients:
                    cells.append(Cell(model, source, "addition", c))
        if self.sweep is not None:
            for model in self.sweep.models:
                cells += [Cell(model, "sweep", pick) for pick in self.sweep.pick_names()]
        return cells

    def addition_layer_for(self, extraction_layer: int) -> int:
        if "absolute" in self.addition_layer:
            return int(self.addition_layer["absolute"])
        return extraction_layer + int(self.addition_layer.get("offset", 0))

    def intervention_params(self) -> dict:
        """Every intervention setting that changes generations, for Snakemake params."""
        return {"normalize": self.normalize, "addition_layer": self.addition_layer,
                "ablation_layers": self.ablation_layers}

    def direction_choice(self, model: str) -> tuple[int | None, int, bool]:
        """(layer, position, forced): forced by the experiment's `direction.force` or the model YAML."""
        spec = self.models[model]
        d = self.raw.get("direction") or {}
        for entry in d.get("force") or []:
            if entry["model"] == model:
                return int(entry["layer"]), int(entry.get("position", -1)), True
        forced = spec.direction_force or d.get("select") == "configured"
        return spec.direction_layer, spec.direction_position, bool(forced)

    def selection_settings(self) -> dict:
        d = self.raw.get("direction") or {}
        return {"filter": bool(d.get("filter", True)), **(d.get("selection") or {})}


def format_coefficient(c: float) -> str:
    return f"{c:g}"


# --------------------------------------------------------------------------- loading


def compose(overrides: list[str] | None = None, conf_dir: Path | str | None = None) -> tuple[DictConfig, str]:
    """Compose conf/config.yaml with Hydra overrides; return (config, experiment choice)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR).resolve()
    if not (conf_dir / "config.yaml").exists():
        raise ConfigError(conf_dir / "config.yaml", "-", "missing top-level config file")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []),
                                return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(conf_dir / "config.yaml", "overrides", first) from None
    finally:
        GlobalHydra.instance().clear()
    choice = cfg.hydra.runtime.choices.get("experiment")
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    return OmegaConf.create(with_hydra), choice


def load_experiment(overrides: list[str] | None = None, conf_dir: Path | str | None = None,
                    results_dir: Path | str | None = None) -> Experiment:
    conf_dir = Path(conf_dir or DEFAULT_CONF_DIR).resolve()
    cfg, choice = compose(overrides, conf_dir)
    exp_file = _rel(conf_dir / "experiment" / f"{choice}.yaml")
    if "experiment" not in cfg or cfg.experiment is None:
        raise ConfigError(_rel(conf_dir / "config.yaml"), "experiment", "no experiment selected")
    try:
        e = OmegaConf.to_container(cfg.experiment, resolve=True)
    except Exception as err:  # interpolation errors
        raise ConfigError(exp_file, "experiment", f"cannot resolve: {err}") from None
    root = results_dir or cfg.get("results_dir", "results")
    return build_experiment(e, exp_file, conf_dir, Path(root))


def build_experiment(e: dict, exp_file: str, conf_dir: Path, results_dir: Path) -> Experiment:
    name = _require(e, "name", exp_file, str)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ConfigError(exp_file, "name", f"'{name}' must be letters, digits, '.', '_' or '-'")
    model_names = _require(e, "models", exp_file, list)
    if not model_names:
        raise ConfigError(exp_file, "models", "lists no model")
    models = {}
    for i, m in enumerate(model_names):
        models[m] = load_model(m, conf_dir, exp_file, f"models[{i}]")

    pairs = []
    for i, p in enumerate(e.get("pairs") or []):
        key = f"pairs[{i}]"
        if not isinstance(p, dict) or set(p) != {"base", "chat"}:
            raise ConfigError(exp_file, key, "a pair is {base: <model>, chat: <model>}")
        for side in ("base", "chat"):
            if p[side] not in models:
                raise ConfigError(exp_file, f"{key}.{side}", f"model '{p[side]}' is not in this experiment's models")
        pairs.append((p["base"], p["chat"]))

    ds = _require(e, "datasets", exp_file, dict)
    datasets, dataset_splits = {}, {}
    for label in ("harmful", "harmless"):
        names = _split_dataset_names(_require(ds, label, exp_file, None, prefix="datasets."), exp_file, label)
        loaded = {}
        for split, dname in names.items():
            key = f"datasets.{label}" if isinstance(ds[label], str) else f"datasets.{label}.{split}"
            if dname not in loaded:
                loaded[dname] = load_dataset_spec(dname, label, conf_dir, exp_file, key)
        dataset_splits[label] = {split: loaded[dname] for split, dname in names.items()}
        datasets[label] = dataset_splits[label]["train"]

    split = _require(e, "split", exp_file, dict)
    for k in ("train", "val", "test", "seed"):
        v = _require(split, k, exp_file, int, prefix="split.")
        if v < 0 or (k in ("train", "test") and v == 0):
            raise ConfigError(exp_file, f"split.{k}", f"must be positive, got {v}")

    direction = e.get("direction") or {}
    sources = list(direction.get("sources", ["self", "random"]))
    for s in sources:
        if s not in ("self", "random"):
            raise ConfigError(exp_file, "direction.sources",
                              f"unknown source '{s}' (use self, random; other models come from pairs)")
    if direction.get("select", "auto") not in ("auto", "configured"):
        raise ConfigError(exp_file, "direction.select", "must be auto or configured")
    for i, entry in enumerate(direction.get("force") or []):
        if not isinstance(entry, dict) or "model" not in entry or "layer" not in entry:
            raise ConfigError(exp_file, f"direction.force[{i}]", "an entry is {model: <name>, layer: L, position: P}")
        if entry["model"] not in models:
            raise ConfigError(exp_file, f"direction.force[{i}].model",
                              f"model '{entry['model']}' is not in this experiment's models")

    iv_name = _require(e, "interventions", exp_file, str)
    iv_file, iv = _load_group(conf_dir, "intervention", iv_name, exp_file, "interventions")
    coefficients = [float(c) for c in ((iv.get("addition") or {}).get("coefficients") or [])]
    ablation, ablation_layers = _ablation_setting(iv.get("ablation", True), iv_file)
    addition_layer = _addition_layer_setting((iv.get("addition") or {}).get("layer"), iv_file)
    orthogonalization = bool(iv.get("orthogonalization", False))
    if ablation_layers is not None and orthogonalization:
        raise ConfigError(iv_file, "orthogonalization", "weight orthogonalisation edits every layer; "
                          "it cannot be combined with an ablation layer range")
    normalize = bool((iv.get("addition") or {}).get("normalize", False))

    sc_name = _require(e, "scoring", exp_file, str)
    scorer = load_scorer(sc_name, conf_dir, exp_file)

    gen = dict(e.get("generation") or {})
    gen.setdefault("max_new_tokens", 24)
    gen.setdefault("batch_size", 16)
    if int(gen["max_new_tokens"]) < 1:
        raise ConfigError(exp_file, "generation.max_new_tokens", "must be at least 1")

    act = dict(e.get("activations") or {})
    act.setdefault("batch_size", 16)
    act.setdefault("dtype", "float16")
    if act["dtype"] not in ("float16", "float32"):
        raise ConfigError(exp_file, "activations.dtype", f"'{act['dtype']}' is not float16 or float32")

    capability = {"enabled": True, "n": 16, "reference": "pkg:harmless_reference.jsonl", **(e.get("capability") or {})}
    if capability["enabled"] and not resolve_data_path(capability["reference"]).exists():
        raise ConfigError(exp_file, "capability.reference", f"file not found: {capability['reference']}")

    coherence = {**COHERENCE_DEFAULTS, **(e.get("coherence") or {})}
    for k, v in coherence.items():
        if k not in COHERENCE_DEFAULTS:
            raise ConfigError(exp_file, f"coherence.{k}", f"unknown key (use {', '.join(COHERENCE_DEFAULTS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (k == "nll_prompts" and v != int(v)):
            raise ConfigError(exp_file, f"coherence.{k}", f"must be a non-negative number, got {v!r}")

    device = e.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(exp_file, "device", f"'{device}' is not auto, cpu or cuda")

    exp = Experiment(
        name=name, file=exp_file, results_dir=results_dir, models=models, pairs=pairs,
        datasets=datasets, dataset_splits=dataset_splits, split=split, activations=act, sources=sources,
        random_seed=int(direction.get("random_seed", 0)), ablation=ablation,
        coefficients=coefficients, orthogonalization=orthogonalization, normalize=normalize, scorer=scorer, generation=gen, device=device,
        threads=int(e.get("threads", 2)), capability=capability, addition_layer=addition_layer,
        ablation_layers=ablation_layers, sweep=load_sweep(e.get("sweep"), exp_file, models),
        coherence=coherence, raw=e,
    )
    _check_pairs_hidden_size(exp)
    if exp.sweep is not None and split["val"] == 0:
        raise ConfigError(exp_file, "split.val", "the sweep scores cells on val prompts; set split.val")
    auto = [m for m in models if not exp.direction_choice(m)[2]]
    if auto and split["val"] == 0:
        raise ConfigError(exp_file, "split.val", f"automatic direction selection ({', '.join(auto)}) needs val prompts; "
                          "set split.val or force the direction in the model YAML")
    from .sources import check_source  # cheap file checks; sources imports this module

    for spec in [*models.values(), *([scorer.judge] if scorer.judge else [])]:
        check_source(spec)
    return exp


def _split_dataset_names(value, file: str, label: str) -> dict[str, str]:
    """`harmful: advbench` (one set, split three ways) or `harmful: {train: advbench, test: jbb-harmful}`."""
    if isinstance(value, str):
        return {"train": value, "val": value, "test": value}
    if not isinstance(value, dict) or "train" not in value or not set(value) <= {"train", "val", "test"}:
        raise ConfigError(file, f"datasets.{label}", "is a dataset name or {train: NAME, val: NAME, test: NAME} "
                          "(val and test default to train's)")
    for split, name in value.items():
        if not isinstance(name, str):
            raise ConfigError(file, f"datasets.{label}.{split}", f"must be a dataset name, got {name!r}")
    return {"train": value["train"], "val": value.get("val", value["train"]), "test": value.get("test", value["train"])}


def _ablation_setting(value, file: str) -> tuple[bool, tuple[int, int] | None]:
    """`ablation: true|false`, or `ablation: {layers: {start: a, stop: b}}` to ablate blocks a..b-1 only."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, dict) and isinstance(value.get("layers"), dict) and "stop" in value["layers"]:
        start, stop = int(value["layers"].get("start", 0)), int(value["layers"]["stop"])
        if not 0 <= start < stop:
            raise ConfigError(file, "ablation.layers", f"needs 0 <= start < stop, got {start}..{stop}")
        return True, (start, stop)
    raise ConfigError(file, "ablation", "must be true, false or {layers: {start: A, stop: B}}")


def _addition_layer_setting(value, file: str) -> dict:
    """Where addition happens: `{offset: k}` from the extraction layer (default 0) or `{absolute: L}`."""
    if value is None:
        return {"offset": 0}
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("offset", "absolute"):
        (k, v), = value.items()
        if isinstance(v, bool) or not isinstance(v, int) or (k == "absolute" and v < 0):
            raise ConfigError(file, f"addition.layer.{k}", f"must be an integer{' >= 0' if k == 'absolute' else ''}, "
                              f"got {v!r}")
        return {k: v}
    raise ConfigError(file, "addition.layer", "must be {offset: K} (from the extraction layer) or {absolute: L}")


def load_sweep(d: dict | None, file: str, models: dict) -> SweepSpec | None:
    if not d or not d.get("enabled", True):
        return None
    if not isinstance(d, dict):
        raise ConfigError(file, "sweep", "must be a mapping")
    names = list(d.get("models") or models)
    for i, m in enumerate(names):
        if m not in models:
            raise ConfigError(file, f"sweep.models[{i}]", f"model '{m}' is not in this experiment's models")
    layers = d.get("extraction_layers")
    if isinstance(layers, dict):
        if "stop" not in layers:
            raise ConfigError(file, "sweep.extraction_layers", "a range is {start: A, stop: B, step: S}")
        layers = list(range(int(layers.get("start", 0)), int(layers["stop"]), int(layers.get("step", 1))))
    elif layers is not None and not isinstance(layers, list):
        raise ConfigError(file, "sweep.extraction_layers", "must be a list of layers or {start, stop, step}")
    position = d.get("position", "selected")
    if position != "selected" and (isinstance(position, bool) or not isinstance(position, int) or position >= 0):
        raise ConfigError(file, "sweep.position", f"must be 'selected' or a negative position, got {position!r}")
    offsets = sorted({int(o) for o in d.get("addition_offsets", [0])} | {0})  # 0: the same-layer comparison
    coefficients = tuple(float(c) for c in d.get("coefficients") or [])
    if not coefficients:
        raise ConfigError(file, "sweep.coefficients", "lists no coefficient")
    gen = d.get("generate") or {}
    cells = []
    for i, c in enumerate(gen.get("cells") or []):
        if not isinstance(c, dict) or not {"layer", "addition_layer", "coefficient"} <= set(c):
            raise ConfigError(file, f"sweep.generate.cells[{i}]",
                              "a cell is {layer: L, addition_layer: A, coefficient: C}")
        cells.append((int(c["layer"]), int(c["addition_layer"]), float(c["coefficient"])))
    counts = {k: int(gen.get(k, v)) for k, v in (("top", 1), ("spread", 0), ("top_ablation", 1))}
    for k, v in counts.items():
        if v < 0:
            raise ConfigError(file, f"sweep.generate.{k}", f"must be >= 0, got {v}")
    return SweepSpec(models=tuple(names), extraction_layers=tuple(int(x) for x in layers) if layers else None,
                     position=None if position == "selected" else int(position), offsets=tuple(offsets),
                     coefficients=coefficients, ablation=bool(d.get("ablation", True)),
                     batch_size=int(d.get("batch_size", 32)), cells=tuple(cells), **counts)


def _check_pairs_hidden_size(exp: Experiment) -> None:
    """Refuse a pair whose hidden sizes differ, when both sizes are known from YAML."""
    for i, (base, chat) in enumerate(exp.pairs):
        sizes = [exp.models[m].source.get("hidden_size") for m in (base, chat)]
        if None not in sizes and sizes[0] != sizes[1]:
            raise ConfigError(exp.file, f"pairs[{i}]",
                              f"hidden sizes differ ({base}: {sizes[0]}, {chat}: {sizes[1]}); a direction cannot transfer")


def load_model(name: str, conf_dir: Path, ref_file: str, ref_key: str) -> ModelSpec:
    file, m = _load_group(conf_dir, "model", name, ref_file, ref_key)
    source = _require(m, "source", file, dict)
    kinds = [k for k in SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise ConfigError(file, "source", f"needs exactly one of {', '.join(SOURCE_KINDS)}")
    kind = kinds[0]
    if kind == "gguf_parts":
        if not source["gguf_parts"]:
            raise ConfigError(file, "source.gguf_parts", "lists no part")
        if not re.fullmatch(r"[0-9a-f]{64}", str(source.get("sha256", ""))):
            raise ConfigError(file, "source.sha256", "a GGUF source needs its sha256 (64 hex digits)")
    if kind == "random_init":
        ri = source["random_init"]
        for k in ("architecture", "config", "special_tokens"):
            _require(ri, k, file, None, prefix="source.random_init.")
    tname = _require(m, "template", file, str)
    template = load_template(tname, conf_dir, file)
    dtype = m.get("dtype", "auto")
    if dtype not in DTYPES:
        raise ConfigError(file, "dtype", f"'{dtype}' is not one of {', '.join(DTYPES)}")
    if m.get("role", "chat") not in ("chat", "base", "judge"):
        raise ConfigError(file, "role", f"'{m.get('role')}' is not chat, base or judge")
    direction = m.get("direction") or {}
    refusal_tokens = m.get("refusal_tokens") or []
    if not isinstance(refusal_tokens, list) or not all(isinstance(t, str) for t in refusal_tokens):
        raise ConfigError(file, "refusal_tokens", "must be a list of strings")
    return ModelSpec(
        name=name, file=file, source=source, template=template,
        add_bos=bool(m.get("add_bos", False)), dtype=dtype,
        trust_remote_code=bool(m.get("trust_remote_code", False)),
        role=m.get("role", "chat"), refusal_tokens=tuple(refusal_tokens),
        direction_layer=direction.get("layer"), direction_position=int(direction.get("position", -1)),
        direction_force=bool(direction.get("force", False)),
    )


def load_template(name: str, conf_dir: Path, ref_file: str) -> TemplateSpec:
    file, t = _load_group(conf_dir, "template", name, ref_file, "template")
    text = _require(t, "text", file, str)
    if text.count("{instruction}") != 1:
        raise ConfigError(file, "text", "the template must contain {instruction} exactly once")
    if not text.split("{instruction}")[1]:
        raise ConfigError(file, "text", "nothing follows {instruction}: there are no post-instruction tokens")
    return TemplateSpec(name=name, text=text)


def load_dataset_spec(name: str, label: str, conf_dir: Path, ref_file: str, ref_key: str) -> DatasetSpec:
    file, d = _load_group(conf_dir, "dataset", name, ref_file, ref_key)
    if ("path" in d) == ("hub_id" in d):
        raise ConfigError(file, "path", "a dataset needs exactly one of path (local file) or hub_id")
    path = d.get("path")
    if path is not None:
        resolved = resolve_data_path(path)
        if not resolved.exists():
            raise ConfigError(file, "path", f"file not found: {path}")
        path = str(resolved)
    return DatasetSpec(
        name=name, file=file, label=label, path=path, hub_id=d.get("hub_id"),
        subset=d.get("subset"), split=d.get("split", "train"), field=d.get("field", "instruction"),
        id_field=d.get("id_field"), category_field=d.get("category_field"),
        filter_empty=d.get("filter_empty"),
    )


def resolve_data_path(path: str) -> Path:
    """`pkg:` paths point into the package's own data folder; others are relative to the project."""
    if path.startswith("pkg:"):
        return Path(__file__).resolve().parent / "data" / path[4:]
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


def load_scorer(name: str, conf_dir: Path, ref_file: str) -> ScorerSpec:
    file, s = _load_group(conf_dir, "scoring", name, ref_file, "scoring")
    kind = s.get("kind", "prefix")
    if kind not in ("prefix", "substring", "judge"):
        raise ConfigError(file, "kind", f"'{kind}' is not prefix, substring or judge")
    if kind == "judge":
        judge = load_model(_require(s, "model", file, str), conf_dir, file, "model")
        prompt = _require(s, "prompt", file, str)
        for slot in ("{instruction}", "{response}"):
            if prompt.count(slot) != 1:
                raise ConfigError(file, "prompt", f"must contain {slot} exactly once")
        labels = _require(s, "labels", file, dict)
        if set(labels) != {"refused", "complied"} or not all(isinstance(v, str) and v for v in labels.values()):
            raise ConfigError(file, "labels", "must be {refused: <text>, complied: <text>}")
        margin = s.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ConfigError(file, "margin", f"must be a number, got {margin!r}")
        return ScorerSpec(name=name, kind=kind, phrases=(), case_sensitive=False, judge=judge, prompt=prompt,
                          labels=(labels["refused"], labels["complied"]), margin=float(margin))
    phrases = _require(s, "phrases", file, list)
    if not phrases:
        raise ConfigError(file, "phrases", "lists no phrase")
    return ScorerSpec(name=name, kind=kind, phrases=tuple(phrases),
                      case_sensitive=bool(s.get("case_sensitive", False)))


def _load_group(conf_dir: Path, group: str, name: str, ref_file: str, ref_key: str) -> tuple[str, dict]:
    path = conf_dir / group / f"{name}.yaml"
    if not isinstance(name, str) or not path.exists():
        avail = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        raise ConfigError(ref_file, ref_key,
                          f"unknown {group} '{name}' (no conf/{group}/{name}.yaml; available: {', '.join(avail)})")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:
        raise ConfigError(_rel(path), "-", f"not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(_rel(path), "-", "must be a mapping")
    return _rel(path), data


def _require(d: dict, key: str, file: str, typ: type | None, prefix: str = "") -> Any:
    if not isinstance(d, dict) or key not in d or d[key] is None:
        raise ConfigError(file, prefix + key, "missing")
    v = d[key]
    if typ is list and isinstance(v, (list, ListConfig)):
        return list(v)
    if typ is int and isinstance(v, bool):
        raise ConfigError(file, prefix + key, f"must be an integer, got {v!r}")
    if typ is not None and not isinstance(v, typ):
        raise ConfigError(file, prefix + key, f"must be {typ.__name__}, got {v!r}")
    return v


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def experiment_from_snakemake(smk) -> Experiment:
    """Rebuild the experiment inside a job from the same overrides the Snakefile used."""
    import shlex

    return load_experiment(shlex.split(str(smk.config.get("overrides", ""))),
                           conf_dir=smk.config.get("conf_dir"))


def cell_for(exp: Experiment, model: str, source: str, intervention_id: str) -> Cell:
    for cell in exp.cells():
        if (cell.model, cell.source, cell.intervention_id) == (model, source, intervention_id):
            return cell
    raise KeyError(f"no grid cell {model}/{source}/{intervention_id} in {exp.file}")
