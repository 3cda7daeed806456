"""Affine ablation (Marshall et al. 2024, "Refusal in LLMs: an affine function", arXiv 2411.09003):
h <- h - (h . u) u + (m_l . u) u + alpha u, u the unit direction and m_l the edited model's mean block
input over the harmless train prompts at block l (at the direction's post-instruction position).

Directional ablation moves the stream's component along u to zero, a value harmless prompts never
have; this moves it to where harmless prompts sit, plus alpha: alpha = 0 bypasses refusal, alpha > 0
induces it. The component is set at every block's input and each writer's output loses its
component, so after every write the stream's component is m_l . u + alpha for the block l it is in.
The reference m_l comes from the edited model's own cached activations (a paired direction is set
to the level the edited model's harmless prompts have), all harmless train prompts (no refusal filter).

YAML: `affine: true` (alpha 0) or `affine: {alphas: [0.0, 4.0]}`; one cell per alpha, `affine_<alpha>`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

from pydantic import model_validator
from pydantic_core import PydanticCustomError

from ..yamlschema import Schema
from .base import Edit, InterventionKind, ablate, duplicate_name, register_kind

if TYPE_CHECKING:
    import torch


def set_component(x: torch.Tensor, unit: torch.Tensor, value: float) -> torch.Tensor:
    """x with its component along the unit direction replaced by `value`."""
    u = unit.to(device=x.device, dtype=x.dtype)
    return x + (value - x @ u).unsqueeze(-1) * u


class AffineSettings(Schema):
    alphas: list[float] = [0.0]  # the component's offset from the harmless level, in units of the unit vector

    @model_validator(mode="after")
    def _sane(self):
        if not self.alphas:
            raise PydanticCustomError("empty", "lists no alpha; give at least one (0 bypasses)", {"key": "alphas"})
        for i, a in enumerate(self.alphas):
            if not math.isfinite(a):
                raise PydanticCustomError("finite", "{a} is not a finite number", {"key": f"alphas[{i}]", "a": a})
        clash = duplicate_name(self.alphas)
        if clash:
            i, j, name = clash
            raise PydanticCustomError("duplicate", "{a!r} formats to the same cell name 'affine_{name}' as "
                                      "alphas[{j}]; give distinct values",
                                      {"key": f"alphas[{i}]", "a": self.alphas[i], "name": name, "j": j})
        return self


@dataclass(frozen=True)
class Affine(Edit):
    kind: ClassVar[str] = "affine"
    reference: tuple[float, ...] = ()  # m_l . u for every block l of the edited model
    alpha: float = 0.0

    def at_block_input(self, block: int):
        return partial(set_component, unit=self.unit, value=self.reference[block] + self.alpha)

    def at_writers(self, block: int):
        return partial(ablate, unit=self.unit)

    def last_block(self, n_layers: int) -> int:
        return n_layers - 1

    def layer_problem(self, n_layers: int) -> str | None:
        if len(self.reference) != n_layers:
            return f"affine reference has {len(self.reference)} layers, the model {n_layers}"
        return None

    def columns(self) -> dict:
        return {"coefficient": self.alpha}

    def overflow_hint(self, dtype: str) -> str:
        return f" (alpha {self.alpha:g} is too large for {dtype}: lower it)"


def references(harmless_means, direction: torch.Tensor) -> tuple[float, ...]:
    """m_l . u for every layer, from the harmless means [n_layers, hidden], in float64."""
    unit = direction.double().cpu().numpy()
    unit = unit / (unit @ unit) ** 0.5
    return tuple(float(v) for v in harmless_means.astype("float64") @ unit)


@register_kind
class AffineKind(InterventionKind):
    name = "affine"
    label = "affine ablation"
    settings = bool | AffineSettings
    default = False
    per_coefficient = True
    reads_activations = True
    edit_class = Affine

    @classmethod
    def coefficients(cls, value) -> list[float]:
        if value is True:
            return [0.0]
        return list(value.alphas) if isinstance(value, AffineSettings) else []

    @classmethod
    def edit(cls, target, coefficient, params) -> Affine:
        if target.harmless_means is None:
            raise ValueError("an affine cell needs the edited model's harmless means (its activations parquet)")
        return Affine(direction=target.direction, reference=references(target.harmless_means, target.direction),
                      alpha=float(coefficient))
