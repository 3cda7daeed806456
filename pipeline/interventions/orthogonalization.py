"""Weight orthogonalisation: the ablation baked into the weights. Every matrix that writes to the
residual stream (the embedding, each block's attention and MLP output projections) has the direction
projected out of its output (pipeline.orthogonalize); the model then needs no hook, and is restored
after the cell. Exact against the activation form except where a norm sits after a writer (Gemma 2/3).

YAML: `orthogonalization: true`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from pydantic_core import PydanticCustomError

from .ablation import AblationRange
from .base import Edit, InterventionKind, register_kind


@dataclass(frozen=True)
class Orthogonalization(Edit):
    kind: ClassVar[str] = "orthogonalization"
    edits_weights: ClassVar[bool] = True

    def weights(self, model, device) -> contextlib.AbstractContextManager:
        # torch and transformers load only in the jobs that edit weights, not while the DAG is built
        from ..orthogonalize import orthogonalized

        return orthogonalized(model, self.direction.to(device))

    def columns(self) -> dict:
        return {"ablation_layers": "all"}


@register_kind
class OrthogonalizationKind(InterventionKind):
    name = "orthogonalization"
    label = "orthogonalization"
    settings = bool
    default = False
    edit_class = Orthogonalization

    @classmethod
    def cell_params(cls, value) -> dict:
        return {"ablation_layers": None}

    @classmethod
    def edit(cls, target, coefficient, params) -> Orthogonalization:
        return Orthogonalization(direction=target.direction)

    @classmethod
    def check_file(cls, values) -> None:
        if values.get(cls.name) and isinstance(values.get("ablation"), AblationRange):
            raise PydanticCustomError("combo", "weight orthogonalisation edits every layer; it cannot be combined "
                                      "with an ablation layer range", {"key": cls.name})
