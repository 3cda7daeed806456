"""What every intervention kind is made of, and the registry the kinds declare themselves in.

A kind (one module of this package, or a plugin) is two small classes:

* an `InterventionKind`, the config side: its key and schema in an intervention YAML, the
  grid cells it adds, the settings each cell reads, its report label;
* an `Edit`, the model side: for one cell, what it does to the hidden state at each site of the
  forward pass (the embedding's output, a block's input, a block's writers' outputs), or to
  the weights. `hooks.apply_nnsight` and `hooks.torch_hooks` walk the sites in the order the
  model computes them and apply whatever the edit returns there.

This module imports no torch: the config reads the kinds while the DAG is built.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import create_model, model_validator

from ..registry import Registry
from ..yamlschema import Schema

if TYPE_CHECKING:
    import torch

    from ..architecture import ResidualMap

HiddenFn = Callable[["torch.Tensor"], "torch.Tensor"]


def ablate(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x - (x . u) u: the component along the unit direction removed."""
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


def add(x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return x + vector.to(device=x.device, dtype=x.dtype)


def format_coefficient(c: float) -> str:
    return f"{c:g}"


@dataclass(frozen=True)
class Target:
    """The direction a grid cell uses, and where it was read (its selected layer and position)."""

    direction: torch.Tensor  # raw, unnormalised, [hidden]
    layer: int
    position: int
    model: str  # whose direction: the cell's own model or its pair's
    # the edited model's mean block input over the harmless train prompts at every layer, at `position`,
    # [n_layers, hidden] float64: read only for kinds that declare `reads_activations`
    harmless_means: Any = None


@dataclass(frozen=True)
class Edit:
    """One cell's change to the forward pass; this base changes nothing (the baseline).

    A kind overrides the sites it touches: each returns the function applied to the hidden
    state there, or None to leave it alone. `last_block` is the last block any site is in, so
    a walk can stop early; None means the edit touches no activation at all.
    """

    kind: ClassVar[str] = "baseline"
    edits_weights: ClassVar[bool] = False  # edits the weights for every row: its cell generates alone
    direction: torch.Tensor | None = None

    @functools.cached_property
    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()

    def at_embedding(self) -> HiddenFn | None:
        return None

    def at_block_input(self, block: int) -> HiddenFn | None:
        return None

    def at_writers(self, block: int) -> HiddenFn | None:
        return None

    def last_block(self, n_layers: int) -> int | None:
        return None

    def weights(self, model, device) -> contextlib.AbstractContextManager:
        """The weight edit, undone on exit (weight orthogonalisation); a no-op for activation edits."""
        return contextlib.nullcontext()

    def layer_problem(self, n_layers: int) -> str | None:
        """Why this edit does not fit a model of `n_layers` blocks, or None."""
        return None

    def columns(self) -> dict[str, Any]:
        """The generations table's settings columns this edit fills (addition_layer, coefficient,
        normalized, ablation_layers); the others stay null."""
        return {}

    def overflow_hint(self, dtype: str) -> str:
        """What to change when the edited model's logits are NaN/inf (a too-large coefficient)."""
        return ""

    def check(self, rmap: ResidualMap) -> None:
        if self.direction is not None and self.direction.shape[-1] != rmap.hidden_size:
            raise ValueError(f"direction has size {self.direction.shape[-1]}, the model's hidden size is "
                             f"{rmap.hidden_size}")
        problem = self.layer_problem(rmap.n_layers)
        if problem:
            raise ValueError(problem)


class InterventionKind:
    """A kind of grid cell. Subclass it, set the class attributes, implement `edit`, and decorate it
    with `@register_kind`; its module (or a plugin file the experiment lists) is then all it takes."""

    name: ClassVar[str]  # its key in an intervention YAML, its cells' file names, the summary's `intervention`
    label: ClassVar[str]  # how reports name it
    settings: ClassVar[Any] = bool  # the type of its key's value; None: not configurable (the baseline)
    default: ClassVar[Any] = False  # its value when the YAML leaves the key out
    per_coefficient: ClassVar[bool] = False  # one cell per coefficient, `<name>_<c>`; else one cell, `<name>`
    needs_direction: ClassVar[bool] = True  # False: one cell per model, no direction (source `none`)
    reads_activations: ClassVar[bool] = False  # True: its edit reads the edited model's cached activations
    edit_class: ClassVar[type[Edit]] = Edit  # what its cells run

    @classmethod
    def coefficients(cls, value: Any) -> list[float | None]:
        """One entry per cell it adds for each direction source: a coefficient, or None."""
        return [None] if value else []

    @classmethod
    def cell_params(cls, value: Any) -> dict:
        """The settings its cells read, as plain data (their generate rule's params: editing another
        kind's settings reruns none of its cells)."""
        return {}

    @classmethod
    def edit(cls, target: Target | None, coefficient: float | None, params: dict) -> Edit:
        raise NotImplementedError

    @classmethod
    def check_file(cls, values: dict[str, Any]) -> None:
        """Checks against the other kinds' values in the same file; raise PydanticCustomError with a `key`."""

    @classmethod
    def cell_name(cls, coefficient: float | None = None) -> str:
        return f"{cls.name}_{format_coefficient(coefficient)}" if cls.per_coefficient else cls.name

    @classmethod
    def cell_pattern(cls) -> str:
        """A regular expression for its cells' file names (Snakemake's wildcard constraint)."""
        return rf"{cls.name}_[-+0-9.e]+" if cls.per_coefficient else cls.name

    @classmethod
    def condition(cls, source: str, coefficient: float | None) -> str:
        """How the report names one of its cells."""
        if not cls.needs_direction:
            return cls.label
        if cls.per_coefficient and coefficient is not None:
            return f"{cls.label} {coefficient:+g} ({source})"
        return f"{cls.label} ({source})"


INTERVENTIONS: Registry[type[InterventionKind]] = Registry("intervention kind")


def register_kind(cls: type[InterventionKind]) -> type[InterventionKind]:
    """Class decorator: the kind is known by its `name` from now on, in registration order (the report's)."""
    return INTERVENTIONS.register(cls.name)(cls)


def make_edit(kind: str, **fields) -> Edit:
    """A registered kind's edit by name, from its `Edit` fields (`make_edit("ablation", direction=d)`)."""
    return INTERVENTIONS.get(kind).edit_class(**fields)


def duplicate_name(coefficients: list[float]) -> tuple[int, int, str] | None:
    """(i, j, name) where coefficients i > j format to the same file name (`addition_2`), else None."""
    named: dict[str, int] = {}
    for i, c in enumerate(coefficients):
        name = format_coefficient(c)
        if name in named:
            return i, named[name], name
        named[name] = i
    return None


def configurable() -> list[type[InterventionKind]]:
    return [k for _, k in INTERVENTIONS.items() if k.settings is not None]


def file_schema() -> type[Schema]:
    """The schema of an intervention YAML: one key per registered kind, with the kind's own schema."""
    return _file_schema(tuple(INTERVENTIONS.names()))


@functools.cache
def _file_schema(names: tuple[str, ...]) -> type[Schema]:
    kinds = [INTERVENTIONS.get(n) for n in names]
    kinds = [k for k in kinds if k.settings is not None]

    def check_together(self):
        values = {k.name: getattr(self, k.name) for k in kinds}
        for k in kinds:
            k.check_file(values)
        return self

    fields = {k.name: (k.settings, k.default) for k in kinds}
    validators = {"_check_together": model_validator(mode="after")(check_together)}
    return create_model("InterventionFile", __base__=Schema, __validators__=validators, **fields)
