"""Norm-preserving orthogonalisation (grimjim's "norm-preserving biprojected abliteration", 2025, in
llm-abliteration's per-written-vector form): the weight orthogonalisation, then every vector the weights
write into the residual stream (an embedding row, the output-space vector of a projection's input unit,
a bias) scaled back to the norm it had. The writes stay orthogonal to the direction but keep their
magnitudes, so the edit is no longer the activation ablation; tests/test_norm_preserving.py measures
how far it is on a tiny model. (heretic's `row_normalization` renormalises the other axis of the
stored matrix instead; that form is not offered here.)

YAML: `norm_preserving: true`. Refused, as the plain form is, for models with norms after each
sub-layer (Gemma 2/3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from .base import Edit, InterventionKind, register_kind


@dataclass(frozen=True)
class NormPreserving(Edit):
    kind: ClassVar[str] = "norm_preserving"
    edits_weights: ClassVar[bool] = True

    def weights(self, model, device) -> contextlib.AbstractContextManager:
        from ..orthogonalize import orthogonalized

        return orthogonalized(model, self.direction.to(device), keep_norms=True)

    def columns(self) -> dict:
        return {"ablation_layers": "all"}


@register_kind
class NormPreservingKind(InterventionKind):
    name = "norm_preserving"
    label = "norm-preserving orthogonalization"
    settings = bool
    default = False
    edit_class = NormPreserving

    @classmethod
    def cell_params(cls, value) -> dict:
        return {"ablation_layers": None}

    @classmethod
    def edit(cls, target, coefficient, params) -> NormPreserving:
        return NormPreserving(direction=target.direction)
