"""Directional ablation: x <- x - (x . u) u, u the unit direction, on everything written into the
residual stream (the embedding, each block's attention and MLP outputs), so the stream is orthogonal
to u at every layer and position, generated tokens included. With a layer range, only blocks
start..stop-1 are edited, and the stream they inherit is cleaned at the first of them.

YAML: `ablation: true` (every block) or `ablation: {layers: {start: A, stop: B}}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from ..yamlschema import LayerRange, Schema
from .base import Edit, InterventionKind, ablate, register_kind


class AblationRange(Schema):
    layers: LayerRange


@dataclass(frozen=True)
class Ablation(Edit):
    kind: ClassVar[str] = "ablation"
    layers: tuple[int, int] | None = None  # [start, stop) of the blocks ablated; None: every block

    @property
    def start(self) -> int:
        return 0 if self.layers is None else self.layers[0]

    def ablates(self, block: int) -> bool:
        return self.layers is None or self.layers[0] <= block < self.layers[1]

    def at_embedding(self):
        return partial(ablate, unit=self.unit) if self.start == 0 else None

    def at_block_input(self, block: int):
        # a limited range starts by cleaning the stream it inherits
        return partial(ablate, unit=self.unit) if block == self.start > 0 else None

    def at_writers(self, block: int):
        return partial(ablate, unit=self.unit) if self.ablates(block) else None

    def last_block(self, n_layers: int) -> int:
        return n_layers - 1 if self.layers is None else self.layers[1] - 1

    def layer_problem(self, n_layers: int) -> str | None:
        if self.layers is not None and not 0 <= self.layers[0] < min(self.layers[1], n_layers):
            return f"ablation layers {self.layers[0]}..{self.layers[1] - 1} are outside 0..{n_layers - 1}"
        return None

    def columns(self) -> dict:
        return {"ablation_layers": "all" if self.layers is None else f"{self.layers[0]}-{self.layers[1] - 1}"}


def layer_range(value: bool | AblationRange) -> tuple[int, int] | None:
    """The [start, stop) an `ablation:` value limits the edit to; None: every block."""
    return (value.layers.start, value.layers.stop) if isinstance(value, AblationRange) else None


@register_kind
class AblationKind(InterventionKind):
    name = "ablation"
    label = "ablation"
    settings = bool | AblationRange
    default = True
    edit_class = Ablation

    @classmethod
    def coefficients(cls, value) -> list[None]:
        return [None] if value is not False else []

    @classmethod
    def cell_params(cls, value) -> dict:
        return {"ablation_layers": layer_range(value)}

    @classmethod
    def edit(cls, target, coefficient, params) -> Ablation:
        layers = params.get("ablation_layers")
        return Ablation(direction=target.direction, layers=tuple(layers) if layers else None)
