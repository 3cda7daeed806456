"""The base of every YAML schema, and its validation into one ConfigError line naming the file and key.

Every YAML file is a `Schema`: known keys only (a typo gets a suggestion), exact types (a quoted
"false" is not a boolean), finite numbers. The config files' schemas (pipeline.config) and each
method's own settings (an intervention kind's block, pipeline.interventions) build on it.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
NegInt = Annotated[int, Field(lt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
# Names become file names (conf/<group>/<name>.yaml, results/<experiment>/...): no paths.
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Text = Annotated[str, Field(min_length=1)]


class Schema(BaseModel):
    """A YAML mapping: known keys only, exact types, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), list(cls.model_fields), n=1)
                    hint = f"did you mean '{close[0]}'? " if close else ""
                    raise PydanticCustomError("unknown_key", "unknown key ({hint}known: {known})",
                                              {"key": str(key), "hint": hint, "known": ", ".join(cls.model_fields)})
        return data


class LayerRange(Schema):
    start: NonNegInt = 0
    stop: PosInt
    step: PosInt = 1

    @model_validator(mode="after")
    def _ordered(self):
        if self.start >= self.stop:
            raise ValueError(f"needs start < stop, got {self.start}..{self.stop}")
        return self

    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.start, self.stop, self.step))


_TYPE_MISMATCH = {"list_type", "dict_type", "model_type", "model_attributes_type", "literal_error", "string_type",
                  "int_type", "float_type", "bool_type", "none_required", "is_instance_of", "dataclass_type"}


def validate(schema: type[Schema], data: Any, file: str, prefix: str = "") -> Any:
    """`schema(**data)`, or one ConfigError naming the file and the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(file, prefix.rstrip(".") or "-", f"must be a mapping, got {data!r}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        key, problem = _explain(err)
        raise ConfigError(file, prefix + key if key != "-" else (prefix.rstrip(".") or "-"), problem) from None


def _explain(err: ValidationError) -> tuple[str, str]:
    """The most specific error as (dotted key, problem)."""
    errors = err.errors()
    # unions report every member: take the deepest, and a broken value over "wrong type" for the other members
    chosen = max(errors, key=lambda e: (len(_key_path(e)), e["type"] not in _TYPE_MISMATCH))
    path = _key_path(chosen)
    ctx = chosen.get("ctx") or {}
    if "key" in ctx:
        path = path + [str(ctx["key"])]
    key = ".".join(path).replace(".[", "[") or "-"
    return key, _problem(chosen)


def _key_path(e: dict) -> list[str]:
    """Dotted-key parts of a pydantic error location, without the union members' type tags."""
    parts = []
    for item in e["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _schema_names() or item in ("str", "int", "float", "bool", "list", "dict", "none") \
                or any(ch in item for ch in "[-'"):
            continue
        else:
            parts.append(item)
    return parts


def _problem(e: dict) -> str:
    got = e.get("input")
    shown = f"{got!r}" if not isinstance(got, (dict, list)) else type(got).__name__
    kind = e["type"]
    if kind == "missing":
        return "missing"
    if kind == "bool_type":
        return f"must be true or false, got {shown}" + (" (quoted: a string)" if isinstance(got, str) else "")
    if kind in ("int_type", "int_from_float"):
        return f"must be an integer, got {shown}"
    if kind == "float_type":
        return f"must be a number, got {shown}"
    if kind == "finite_number":
        return f"must be a finite number, got {shown}"
    if kind in ("string_type",):
        return f"must be a string, got {shown}"
    if kind == "literal_error":
        return f"must be one of {e['ctx']['expected']}, got {shown}"
    if kind == "string_pattern_mismatch" and "0-9a-f" in e["ctx"]["pattern"]:
        return f"{shown} must be 64 hex digits"
    if kind == "string_pattern_mismatch":
        return f"{shown} must be letters, digits, '.', '_' or '-' (a name, not a path)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{e['msg'].replace('Input should be', 'must be')}, got {shown}"
    msg = e["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else kind



def _schema_names() -> set[str]:
    """Every Schema subclass's name, wherever it is declared (intervention kinds declare their own): pydantic
    puts a union member's class name in an error's location, which is no key of the YAML."""
    names, todo = {"Schema"}, [Schema]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names
