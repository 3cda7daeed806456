"""A researcher's own intervention kind, as a plugin: the direction's component scaled by a factor.

x <- x - (1 - f) (x . u) u on everything written into the residual stream, like ablation: f = 0 is
ablation exactly, f = 1 leaves the model alone. The tests list this file in an experiment's `plugins:`
and add `scale: {factors: [...]}` to its intervention YAML; nothing in the package names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from pipeline.interventions import Edit, InterventionKind, register_kind
from pipeline.yamlschema import Schema


def scale_component(x, unit, factor: float):
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (1.0 - factor) * (x @ u).unsqueeze(-1) * u


@dataclass(frozen=True)
class ScaleComponent(Edit):
    kind: ClassVar[str] = "scale"
    factor: float = 0.0

    def at_embedding(self):
        return partial(scale_component, unit=self.unit, factor=self.factor)

    def at_writers(self, block: int):
        return partial(scale_component, unit=self.unit, factor=self.factor)

    def last_block(self, n_layers: int) -> int:
        return n_layers - 1

    def columns(self) -> dict:
        return {"coefficient": self.factor, "ablation_layers": "all"}


class ScaleSettings(Schema):
    factors: list[float] = []


@register_kind
class Scale(InterventionKind):
    name = "scale"
    label = "component scaled"
    settings = ScaleSettings
    default = ScaleSettings()
    per_coefficient = True
    edit_class = ScaleComponent

    @classmethod
    def coefficients(cls, value: ScaleSettings) -> list[float]:
        return list(value.factors)

    @classmethod
    def edit(cls, target, coefficient, params) -> ScaleComponent:
        return ScaleComponent(direction=target.direction, factor=float(coefficient))
