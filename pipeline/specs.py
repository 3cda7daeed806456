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
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, TypeAdapter, model_validator
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


# Sweep picks are named <prefix><i>: best1, same1, spread1, ablate1, cell1.
PICK_PREFIXES = ("best", "same", "spread", "ablate", "cell")


def cell_name_pattern() -> str:
    """Every cell file name, as the Snakefile's wildcard constraint: one definition for config, jobs and
    DAG, built from the registered intervention kinds (plugins included), so a new kind needs no list."""
    kinds = [k.cell_pattern() for _, k in INTERVENTIONS.items()]
    return "|".join([*kinds, rf"({'|'.join(PICK_PREFIXES)})[0-9]+"])


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
        return cls.model_validate(data)
    return TypeAdapter(cls).validate_python(data)


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
    file: str  # the model YAML, for error messages
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
    pad_token: str | None = None  # for tokenizers that define no pad (and no eos) token, e.g. Qwen 1
    # Weights spread over devices by accelerate (models larger than one GPU); see config.ModelFile.
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None
    # A Jinja chat template that replaces (or stands in for a missing) tokenizer chat template: what a judge
    # scorer with `chat_template` renders its question with (config.ModelFile).
    chat_template: str | None = None

    @property
    def source_kind(self) -> str:
        return next(k for k in SOURCE_KINDS if self.source.get(k) is not None)

    def for_preparation(self) -> "ModelSpec":
        """This spec with what `prepare_model` does not read blanked, so editing it does not re-prepare.

        A tiny random model's tokenizer is trained on its template and refusal tokens, so
        it keeps them; other sources only need where the weights come from. Where the
        weights are placed when loaded matters to none.
        """
        placed_anywhere = dataclasses.replace(self, device_map=None, max_memory=None, offload_folder=None,
                                              chat_template=None)
        if self.source_kind == "random_init":
            return placed_anywhere
        return dataclasses.replace(placed_anywhere, template=TemplateSpec("-", "{instruction}-"), add_bos=False,
                                   role="-", refusal_tokens=(), direction_layer=None, direction_position=-1,
                                   direction_force=False, pad_token=None)


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


def _model_spec(value: Any) -> Any:
    """A judge's ModelSpec, from its params too (a dataclass, which a strict schema takes as an instance only)."""
    return from_params(ModelSpec, value) if isinstance(value, dict) else value


class ScorerSpec(ScoringFile):
    """A scoring YAML as loaded: its name added, and a judge scorer's `model` resolved to the judge's spec."""

    name: Name
    judge: Annotated[ModelSpec | None, BeforeValidator(_model_spec)] = None


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
    extraction and addition layers from the picks file.
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
