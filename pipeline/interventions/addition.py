"""Activation addition: x <- x + c v at the input of one block, every position, v the raw direction
or its unit vector (`normalize`). In the `every_write` form (the base-models post's hooks on resid_pre,
resid_mid and resid_post of one layer) the same vector is also added to each of that block's writers'
outputs: the attention sub-layer reads c v, the MLP 2 c v, and the stream leaves the block with 3 c v
(parallel-residual blocks: both sub-layers read c v, the stream still leaves with 3 c v).

YAML: `addition: {coefficients: [...], normalize: false, layer: {offset: 0}, form: block_input}`,
one cell per coefficient, `addition_<c>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from ..yamlschema import NonNegInt, Schema
from .base import Edit, InterventionKind, add, duplicate_name, register_kind

# Where an addition adds: the block's input only, or its input and every writer's output.
ADDITION_FORMS = ("block_input", "every_write")

# The largest |coefficient| that is still steering, by `normalize` (issue 17). A unit direction times
# 1e6 is 1e3-1e4 times the residual-stream norms of the models here (tens to a few thousand); the raw
# direction is itself a difference of hidden states, so 1e3 times it is as far out. Past these the stream
# is the vector alone, or float16/bfloat16 overflow to inf and the outputs turn NaN; smaller values can
# still overflow a float16 model, which the generate stage's logit check catches.
MAX_COEFFICIENT = {True: 1.0e6, False: 1.0e3}


def coefficient_problem(c: float, normalize: bool) -> str | None:
    """Why an addition coefficient is absurd for this normalisation, or None."""
    bound = MAX_COEFFICIENT[normalize]
    if abs(c) <= bound:
        return None
    times = "the unit direction (normalize: true)" if normalize else "the raw direction (normalize: false)"
    return (f"{c:g} x {times} is beyond any steering (|coefficient| at most {bound:g}): the vector swamps the "
            "hidden state, and larger ones overflow to NaN")


def addition_layer(extraction_layer: int, offset: int | None, absolute: int | None) -> int:
    """The block an addition steers: `absolute` if given, else the extraction layer moved by `offset`."""
    return absolute if absolute is not None else extraction_layer + (offset or 0)


class AdditionLayer(Schema):
    offset: int | None = None
    absolute: NonNegInt | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.offset is None) == (self.absolute is None):
            raise ValueError("is {offset: K} (from the extraction layer) or {absolute: L}")
        return self


class AdditionSettings(Schema):
    normalize: bool = False  # true: add coefficient x the unit vector (the base-models post)
    coefficients: list[float] = []
    layer: AdditionLayer = AdditionLayer(offset=0)
    # block_input: add once, to the block's input (the direction paper); every_write: also to each of
    # the block's attention and MLP outputs (the base-models post's resid_pre + resid_mid + resid_post
    # hooks: the stream leaves the block with 3x the vector). ADDITION_FORMS, same names.
    form: Literal["block_input", "every_write"] = "block_input"

    @model_validator(mode="after")
    def _sane(self):
        for i, c in enumerate(self.coefficients):
            problem = coefficient_problem(c, self.normalize)
            if problem:
                raise PydanticCustomError("magnitude", "{problem}", {"key": f"coefficients[{i}]", "problem": problem})
        clash = duplicate_name(self.coefficients)
        if clash:
            i, j, name = clash
            c = self.coefficients[i]
            same = "is listed twice" if self.coefficients[j] == c else \
                f"formats to the same name '{name}' as addition.coefficients[{j}]"
            raise PydanticCustomError("duplicate", "{problem}", {"key": f"coefficients[{i}]",
                                                                  "problem": f"{c!r} {same}; give distinct values"})
        return self

    def layer_for(self, extraction_layer: int) -> int:
        return addition_layer(extraction_layer, self.layer.offset, self.layer.absolute)


@dataclass(frozen=True)
class Addition(Edit):
    kind: ClassVar[str] = "addition"
    layer: int | None = None  # the block whose input is steered
    coefficient: float = 0.0
    normalize: bool = False  # add a unit vector instead of the raw direction
    form: str = "block_input"  # one of ADDITION_FORMS

    def __post_init__(self):
        if self.form not in ADDITION_FORMS:
            raise ValueError(f"unknown addition form {self.form!r} (known: {', '.join(ADDITION_FORMS)})")
        if self.direction is None or self.layer is None:
            raise ValueError("addition needs a direction and a layer")

    @property
    def vector(self):
        return self.coefficient * (self.unit if self.normalize else self.direction)

    def at_block_input(self, block: int):
        return partial(add, vector=self.vector) if block == self.layer else None

    def at_writers(self, block: int):
        return partial(add, vector=self.vector) if block == self.layer and self.form == "every_write" else None

    def last_block(self, n_layers: int) -> int:
        return self.layer

    def layer_problem(self, n_layers: int) -> str | None:
        if not 0 <= self.layer < n_layers:
            return f"addition layer {self.layer} is outside 0..{n_layers - 1}"
        return None

    def columns(self) -> dict:
        return {"addition_layer": self.layer, "coefficient": self.coefficient, "normalized": self.normalize}

    def overflow_hint(self, dtype: str) -> str:
        return (f" (coefficient {self.coefficient:g} x the {'unit' if self.normalize else 'raw'} direction at layer "
                f"{self.layer} is too large for {dtype}: lower it)")


@register_kind
class AdditionKind(InterventionKind):
    name = "addition"
    label = "addition"
    settings = AdditionSettings
    default = AdditionSettings()
    per_coefficient = True
    edit_class = Addition

    @classmethod
    def coefficients(cls, value: AdditionSettings) -> list[float]:
        return list(value.coefficients)

    @classmethod
    def cell_params(cls, value: AdditionSettings) -> dict:
        params = {"normalize": value.normalize, "addition_offset": value.layer.offset,
                  "addition_absolute": value.layer.absolute}
        # only when not the default, so cells generated before the option existed keep their params
        if value.form != "block_input":
            params["addition_form"] = value.form
        return params

    @classmethod
    def edit(cls, target, coefficient, params) -> Addition:
        return Addition(direction=target.direction, coefficient=float(coefficient),
                        layer=addition_layer(target.layer, params.get("addition_offset", 0),
                                             params.get("addition_absolute")),
                        normalize=params.get("normalize", False), form=params.get("addition_form", "block_input"))
