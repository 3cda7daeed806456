"""The typed specs that flow from the config to the stages, and the vocabulary of grid cells.

A spec is what one stage reads. The Snakefile passes it to a rule as `params`
(`to_params`: plain lists and dicts, so Snakemake can compare it between runs and
rerun exactly the jobs whose inputs changed) and the rule's script rebuilds it with
`from_params`; no job re-reads the YAML.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, Field, TypeAdapter, model_validator
from pydantic_core import PydanticCustomError

from .interventions import INTERVENTIONS
from .yamlschema import LayerRange, Name, NegInt, NonNegInt, PosInt, Schema, Text

T = TypeVar("T")

SOURCE_KINDS = ("hub", "path", "gguf_parts", "random_init")


class Source(enum.StrEnum):
    """Where a cell's direction comes from (a paired model's name is a source too)."""

    NONE = "none"  # the baseline: no direction
    SELF = "self"
    RANDOM = "random"  # random, with the norm of the model's own direction
    SWEEP = "sweep"  # a cell the sweep picked
    RULE = "rule"  # a selection rule's pick, ablated (direction.generate_picks)
    OPTIMIZE = "optimize"  # a trial of the optimize study (optimize.generate), named front<i>


# Sweep picks are named <prefix><i>: best1, same1, spread1, ablate1, cell1.
PICK_PREFIXES = ("best", "same", "spread", "ablate", "cell")
# direction.select's scoring rules (pipeline/selection.py SELECTORS, which a test holds to this list): a rule's
# pick at the configured KL cap is named after the rule, at another cap <rule>_kl<cap>: auto, cosmic_kl0.4
SELECTION_RULES = ("auto", "cosmic")
# The optimize study's generated trials (optimize.generate) are named front1, front2, ...
FRONT_PREFIX = "front"
# direction.other_methods: another direction method's direction at the selected layer and position is the grid
# source self-<method> (self-projected, ...), beside self (direction.method's) and the paired models' names
METHOD_SOURCE_PREFIX = "self-"


def method_source(method: str) -> str:
    return METHOD_SOURCE_PREFIX + method


def source_method(source: str) -> str | None:
    """The direction method a source self-<method> names, None for any other source."""
    return source.removeprefix(METHOD_SOURCE_PREFIX) if source.startswith(METHOD_SOURCE_PREFIX) else None


# Sources whose cells were chosen from val scores (a selection rule's pick, an optimize trial; the sweep's picks
# best/same/spread/ablate too, by their names): their test rates are the honest ones
PICKED_SOURCES = (Source.RULE, Source.OPTIMIZE)


def reference_source(source: str) -> str:
    """The source whose ablation a cell is tested against: the model's own selected direction (self) for the cells
    that edit or remake it (a selection rule's pick, an optimize trial, another direction method's), else the
    cell's own source."""
    return Source.SELF.value if source in PICKED_SOURCES or source_method(source) else source


def is_partner_source(source: str) -> bool:
    """A paired model's name (base <-> chat transfer), not one of the sources the experiment makes itself."""
    return source not in set(Source) and source_method(source) is None


def rule_pick_name(rule: str, kl_max: float | None = None) -> str:
    return rule if kl_max is None else f"{rule}_kl{kl_max:g}"


def cell_name_pattern() -> str:
    """Every cell file name, as the Snakefile's wildcard constraint: one definition for config, jobs and
    DAG, built from the registered intervention kinds (plugins included), so a new kind needs no list."""
    kinds = [k.cell_pattern() for _, k in INTERVENTIONS.items()]
    rules = rf"({'|'.join(SELECTION_RULES)})(_kl[0-9.e+-]+)?"
    return "|".join([*kinds, rf"({'|'.join(PICK_PREFIXES)})[0-9]+", rules, rf"{FRONT_PREFIX}[0-9]+"])


def to_params(spec: Any) -> Any:
    """A spec as plain data (str, numbers, lists, dicts), for Snakemake params."""
    if isinstance(spec, BaseModel):
        return spec.model_dump(mode="json")
    if dataclasses.is_dataclass(spec):
        return TypeAdapter(type(spec)).dump_python(spec, mode="json")
    return spec


def from_params(cls: type[T], data: Any) -> T:
    """The inverse of `to_params`, in a job."""
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        # lax: the params were validated once from the YAML, and JSON turned a GPU index key of max_memory
        # into a string, which must be an int again
        return cls.model_validate(data, strict=False)
    return TypeAdapter(cls).validate_python(data)


class RandomInit(Schema):
    architecture: Text
    seed: NonNegInt = 0
    vocab_size: PosInt = 512
    special_tokens: Annotated[list[Text], Field(min_length=1)]
    bos: Text | None = None
    eos: Text | None = None
    pad: Text | None = None
    config: dict[str, Any]

    @model_validator(mode="after")
    def _consistent(self):
        # the byte-level BPE always holds the 256 bytes and the special tokens: a smaller vocab_size is ignored
        least = BYTE_ALPHABET + len(set(self.special_tokens))
        if self.vocab_size < least:
            raise PydanticCustomError("vocab", "{n} is fewer than the tokenizer's 256 byte tokens plus its {k} "
                                      "special tokens: at least {least}",
                                      {"key": "vocab_size", "n": self.vocab_size, "k": len(set(self.special_tokens)),
                                       "least": least})
        for role in ("bos", "eos", "pad"):
            token = getattr(self, role)
            if token is not None and token not in self.special_tokens:
                raise PydanticCustomError("special", "'{token}' is not one of special_tokens",
                                          {"key": role, "token": token})
        for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.config:  # set from the trained tokenizer; a second value contradicts it
                raise PydanticCustomError("derived", "is set from the tokenizer built here; remove it from config",
                                          {"key": f"config.{key}"})
        layers = self.config.get("num_hidden_layers", self.config.get("n_layer"))
        if isinstance(layers, int) and layers < 1:
            raise PydanticCustomError("layers", "a model needs at least one block",
                                      {"key": "config.num_hidden_layers" if "num_hidden_layers" in self.config
                                       else "config.n_layer"})
        return self


BYTE_ALPHABET = 256  # symbols of the byte-level pre-tokenizer's initial alphabet


class ModelSource(Schema):
    hub: Text | None = None
    revision: Text | None = None  # hub: a commit (or tag) pinned at prepare time
    path: Text | None = None
    gguf_parts: Annotated[list[Text], Field(min_length=1)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    random_init: RandomInit | None = None
    hidden_size: PosInt | None = None
    architecture: Text | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"needs exactly one of {', '.join(SOURCE_KINDS)}, got {', '.join(kinds) or 'none'}")
        if self.gguf_parts is not None and self.sha256 is None:
            raise ValueError("a GGUF source needs its sha256 (64 hex digits)")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision applies to hub sources only")
        return self

    @property
    def kind(self) -> str:
        """The one of SOURCE_KINDS this source sets."""
        return next(k for k in SOURCE_KINDS if getattr(self, k) is not None)


class ModelDirection(Schema):
    layer: NonNegInt | None = None
    position: NegInt = -1
    force: bool = False


def _device(value: str) -> str:
    if not re.fullmatch(r"cpu|disk|mps|(cuda|xpu)(:[0-9]+)?", value):
        raise ValueError(f"{value!r} is not a device: a GPU index, cpu, disk, mps or cuda:N")
    return value


def _memory_device(value: str) -> str:
    if value not in ("cpu", "disk", "mps"):
        raise ValueError(f"{value!r} is not a device: a GPU index, cpu, disk or mps")
    return value


def _memory_size(value: str) -> str:
    # upper-case B only: accelerate reads "10gb" as gigabits
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?\s*[KMG]i?B", value):
        raise ValueError(f"{value!r} is not a size: bytes, or a number and KiB, MiB, GiB, KB, MB or GB")
    return value


# Where accelerate may put a module: a GPU index, a device, or "disk" (offload_folder then holds it).
Placement = NonNegInt | Annotated[str, AfterValidator(_device)]
MemoryDevice = NonNegInt | Annotated[str, AfterValidator(_memory_device)]
MemorySize = PosInt | Annotated[str, AfterValidator(_memory_size)]
PLACEMENT_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class ModelFile(Schema):
    source: ModelSource
    role: Literal["chat", "base", "judge"] = "chat"
    template: Name
    add_bos: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    refusal_tokens: list[Text] = []
    direction: ModelDirection = ModelDirection()
    pad_token: Text | None = None  # padding, where the tokenizer defines neither a pad nor an eos token
    # A model larger than one GPU: spread its weights as accelerate does, by a strategy or by
    # {module name: device}; the experiment's `device` then does not apply to this model.
    device_map: Literal[PLACEMENT_STRATEGIES] | Annotated[dict[Text, Placement], Field(min_length=1)] | None = None
    max_memory: Annotated[dict[MemoryDevice, MemorySize], Field(min_length=1)] | None = None  # for a strategy
    offload_folder: Text | None = None  # where modules placed on "disk" are kept
    # A Jinja chat template for a judge whose tokenizer ships none (or the one its card publishes): used, in
    # place of the tokenizer's, by judge scorers that read through the judge's own chat template.
    chat_template: Text | None = None

    @model_validator(mode="after")
    def _refusal_tokens(self):
        if self.role != "judge" and not self.refusal_tokens:
            raise PydanticCustomError("no_refusal_tokens", "a {role} model needs refusal_tokens (e.g. [\"I\"])",
                                      {"role": self.role, "key": "refusal_tokens"})
        return self

    @model_validator(mode="after")
    def _placement(self):
        for key in ("max_memory", "offload_folder"):
            if getattr(self, key) is not None and self.device_map is None:
                raise PydanticCustomError("placement", "applies only with a device_map", {"key": key})
        places = self.device_map.values() if isinstance(self.device_map, dict) else ()
        if "disk" in places and self.offload_folder is None:
            raise PydanticCustomError("placement", "device_map puts modules on disk: name a folder for them",
                                      {"key": "offload_folder"})
        return self


class TemplateFile(Schema):
    text: Text

    @model_validator(mode="after")
    def _one_slot(self):
        if self.text.count("{instruction}") != 1:
            raise PydanticCustomError("slot", "the template must contain {slot} exactly once",
                                      {"key": "text", "slot": "{instruction}"})
        if not self.text.split("{instruction}")[1]:
            raise PydanticCustomError("slot", "nothing follows {slot}: there are no post-instruction tokens",
                                      {"key": "text", "slot": "{instruction}"})
        return self


class TemplateSpec(TemplateFile):
    """A template YAML as loaded: its name added."""

    name: Name

    @property
    def prefix(self) -> str:
        return self.text.split("{instruction}")[0]

    @property
    def suffix(self) -> str:
        """The post-instruction part: where refusal is decided."""
        return self.text.split("{instruction}")[1]

    def format(self, instruction: str) -> str:
        return self.prefix + instruction + self.suffix


class ModelSpec(ModelFile):
    """A model YAML as loaded: its name and file added, and `template` resolved to the template's spec."""

    name: Name
    file: str  # the model YAML, for error messages
    template: TemplateSpec

    def for_preparation(self) -> ModelSpec:
        """This spec with what `prepare_model` does not read blanked, so editing it does not re-prepare.

        A tiny random model's tokenizer is trained on its template and refusal tokens, so
        it keeps them; other sources only need where the weights come from. Where the
        weights are placed when loaded matters to none.
        """
        placed_anywhere = self.model_copy(update={"device_map": None, "max_memory": None, "offload_folder": None,
                                                  "chat_template": None})
        if self.source.kind == "random_init":
            return placed_anywhere
        # blanks the job's validation accepts: a judge is the one role that needs no refusal tokens
        return placed_anywhere.model_copy(update={
            "template": TemplateSpec(name="none", text="{instruction}-"), "add_bos": False, "role": "judge",
            "refusal_tokens": [], "direction": ModelDirection(), "pad_token": None})


class DatasetFile(Schema):
    """A dataset YAML (conf/dataset/<name>.yaml): where a prompt set lives and which rows and columns to read."""

    path: Text | None = None
    hub_id: Text | None = None
    url: Annotated[str, Field(pattern=r"^https://\S+$")] | None = None  # a file published outside the hub
    format: Literal["json", "csv"] = "json"  # of path or url (JSON Lines or a JSON array; CSV with a header)
    subset: Text | None = None
    split: Text = "train"
    field: Text = "instruction"
    id_field: Text | None = None
    category_field: Text | None = None
    filter_empty: Text | None = None  # skip rows where this column is non-empty
    # keep only rows whose columns hold these values; kept sorted by column, so params do not depend on key order
    where: Annotated[dict[Text, Text], AfterValidator(lambda d: dict(sorted(d.items())))] = {}

    @model_validator(mode="after")
    def _one_place(self):
        if sum(x is not None for x in (self.path, self.hub_id, self.url)) != 1:
            raise PydanticCustomError("place", "needs exactly one of path (a local file), hub_id or url",
                                      {"key": "path"})
        return self


class DatasetSpec(DatasetFile):
    """A dataset YAML as loaded: its name, file and label added, and `path` resolved to an absolute path."""

    name: Name
    file: str  # the dataset YAML, for error messages
    label: Literal["harmful", "harmless"]

    def __hash__(self) -> int:  # a key of the checks' parse cache; `where` is a dict
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))


class Labels(Schema):
    refused: Text
    complied: Text


class ChatQuestion(Schema):
    """A judge's question as its own chat template renders [user: instruction, assistant: response] (the
    direction paper's Llama Guard 2 input): `add_generation_prompt` as the template expects it (Llama Guard's
    templates end at the point the verdict follows either way), `reply_prefix` what the judge writes before
    its label where the template stops short of it (Llama Guard 3: "\n\n" after the assistant header)."""

    add_generation_prompt: bool = False
    reply_prefix: str = ""


class ScoringFile(Schema):
    kind: Literal["prefix", "substring", "judge"] = "prefix"
    phrases: list[Text] = []
    case_sensitive: bool = False
    # Fold typographic quotes and apostrophes (’ ‘ “ ”) to straight ones in completion and phrases alike,
    # so "I can’t" matches "I can't". Off by default: neither paper's scorer folds.
    fold_quotes: bool = False
    model: Name | None = None
    prompt: Text | None = None
    labels: Labels | None = None
    margin: float = 0.0
    # judge: replies of fewer words (split on spaces) count as refused without asking it; 15 is the
    # direction paper's Llama Guard rule (a short reply carries no harmful content). 0: off.
    short_reply_words: NonNegInt = 0
    # judge: ask through the judge's own chat template instead of `prompt` (one of the two)
    chat_template: ChatQuestion | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.kind != "judge" and self.chat_template is not None:
            raise PydanticCustomError("judge_only", "applies to judge scorers only", {"key": "chat_template"})
        if self.kind == "judge":
            for key in ("model", "labels"):
                if getattr(self, key) is None:
                    raise PydanticCustomError("missing", "a judge scorer needs {key}", {"key": key})
            if (self.prompt is None) == (self.chat_template is None):
                raise PydanticCustomError("question", "a judge scorer needs exactly one of prompt (a question in the "
                                          "judge's prompt template) and chat_template (its own chat template)",
                                          {"key": "prompt"})
            for slot in ("{instruction}", "{response}") if self.prompt is not None else ():
                if self.prompt.count(slot) != 1:
                    raise PydanticCustomError("slot", "must contain {slot} exactly once",
                                              {"key": "prompt", "slot": slot})
        elif not self.phrases:
            raise PydanticCustomError("missing", "lists no phrase", {"key": "phrases"})
        for i, phrase in enumerate(self.phrases):
            if not phrase.strip():  # "" or " " is in (or starts) nearly every completion
                raise PydanticCustomError("blank", "{phrase} is blank: it would count nearly every completion as a "
                                          "refusal", {"key": f"phrases[{i}]", "phrase": repr(phrase)})
            if self.kind == "prefix" and phrase != phrase.lstrip():
                raise PydanticCustomError("dead", "{phrase} starts with whitespace, and a prefix is matched on the "
                                          "stripped completion: it can never match", {"key": f"phrases[{i}]",
                                                                                       "phrase": repr(phrase)})
        return self


class ScorerSpec(ScoringFile):
    """A scoring YAML as loaded: its name added, and a judge scorer's `model` resolved to the judge's spec."""

    name: Name
    judge: ModelSpec | None = None


class Length(Schema):
    """Refusal rate vs generation length (pipeline/length.py): each completion is scored on its
    first k tokens for each k; the longest k must not exceed generation.max_new_tokens."""

    tokens: Annotated[list[PosInt], Field(min_length=1)]
    scorers: Annotated[list[Name], Field(min_length=1)] | None = None  # None: the experiment's phrase scorers


@dataclass(frozen=True)
class LengthSpec:
    """The experiment's `length` block as validated, and the phrase scorers it resolves to."""

    settings: Length
    scorers: tuple[ScorerSpec, ...]  # phrase scorers only: `settings.scorers`, else the experiment's

    @property
    def tokens(self) -> tuple[int, ...]:
        """Each k, ascending."""
        return tuple(sorted(self.settings.tokens))


@dataclass(frozen=True)
class InterventionSpec:
    """The intervention settings shared by every cell of an experiment (one intervention YAML): each
    registered kind's value, validated by the kind's own schema (pipeline.interventions)."""

    file: str
    values: dict[str, Any]  # kind name -> its value (a bool, or the kind's settings)

    def __getitem__(self, kind: str) -> Any:
        return self.values[kind]

    def cell_params(self, kind: str) -> dict:
        return INTERVENTIONS.get(kind).cell_params(self.values.get(kind))


@dataclass(frozen=True)
class Cell:
    """One grid cell: a model, where its direction comes from, and what is done.

    Sweep cells (source "sweep") are picked by the sweep stage from its logit scores:
    `pick` is then the pick's name (best1, same1, ...) and the generate job reads the
    extraction and addition layers from the picks file. Rule cells (source "rule") ablate the candidate
    a selection rule picks (`pick`: auto, cosmic_kl0.4, ...; the selection table's `picks` column says which).
    """

    model: str
    source: str  # a `Source`, or a paired model's name
    kind: str | None = None  # a registered intervention kind; None for sweep picks (the picks file says)
    coefficient: float | None = None
    pick: str | None = None

    @property
    def name(self) -> str:
        return self.pick if self.pick is not None else INTERVENTIONS.get(self.kind).cell_name(self.coefficient)


class SweepCell(Schema):
    layer: NonNegInt
    addition_layer: NonNegInt
    coefficient: float


class SweepGenerate(Schema):
    top: NonNegInt = 1  # generate the best `top` addition cells (and each one's same-layer cell)
    spread: NonNegInt = 0  # ... and `spread` cells spread over the score range, for the correlation
    top_ablation: NonNegInt = 1
    cells: list[SweepCell] = []  # declared cells, generated as well


class Sweep(Schema):
    """The cheap logit-score sweep (extraction layer x addition layer x coefficient) and its picks."""

    enabled: bool = True
    models: list[Name] | None = None  # None: every model of the experiment
    extraction_layers: list[NonNegInt] | LayerRange | None = None  # None (or []): every layer
    position: Literal["selected"] | NegInt = "selected"
    addition_offsets: list[int] = [0]  # addition layer = extraction layer + offset
    coefficients: Annotated[list[float], Field(min_length=1)]
    ablation: bool = True  # also score ablation of each extraction layer's direction
    batch_size: PosInt = 32
    generate: SweepGenerate = SweepGenerate()


class SweepSpec(Schema):
    """The experiment's `sweep` block as validated, its `models` resolved (never None: the experiment's
    models when the block names none); what the stages read is derived from it below."""

    settings: Sweep

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.settings.models)

    @property
    def extraction_layers(self) -> tuple[int, ...] | None:
        """None: every layer."""
        layers = self.settings.extraction_layers
        return layers.layers() if isinstance(layers, LayerRange) else (tuple(layers) if layers else None)

    @property
    def position(self) -> int | None:
        """None: the selected direction's position."""
        return None if self.settings.position == "selected" else self.settings.position

    @property
    def offsets(self) -> tuple[int, ...]:
        """The declared offsets and 0 (the same-layer comparison), ascending."""
        return tuple(sorted(set(self.settings.addition_offsets) | {0}))

    @property
    def coefficients(self) -> tuple[float, ...]:
        return tuple(self.settings.coefficients)

    @property
    def ablation(self) -> bool:
        return self.settings.ablation

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    @property
    def top(self) -> int:
        return self.settings.generate.top

    @property
    def spread(self) -> int:
        return self.settings.generate.spread

    @property
    def top_ablation(self) -> int:
        return self.settings.generate.top_ablation

    @property
    def cells(self) -> tuple[tuple[int, int, float], ...]:
        """The declared cells as (extraction layer, addition layer, coefficient)."""
        return tuple((c.layer, c.addition_layer, c.coefficient) for c in self.settings.generate.cells)

    def pick_names(self) -> list[str]:
        names = [f"best{i + 1}" for i in range(self.top)] + [f"same{i + 1}" for i in range(self.top)]
        names += [f"spread{i + 1}" for i in range(self.spread)]
        names += [f"ablate{i + 1}" for i in range(self.top_ablation if self.ablation else 0)]
        return names + [f"cell{i + 1}" for i in range(len(self.cells))]
