"""Norm-preserving orthogonalisation (grimjim's "norm-preserving biprojected abliteration", 2025, in
llm-abliteration's per-written-vector form): the weight orthogonalisation, then every vector the weights
write into the residual stream (an embedding row, the output-space vector of a projection's input unit,
a bias) scaled back to the norm it had. The writes stay orthogonal to the direction but keep their
magnitudes, so the edit is no longer the activation ablation; tests/test_norm_preserving.py measures
how far it is on a tiny model. (heretic's `row_normalization` renormalises the other axis of the
stored matrix instead; that form is not offered here.)

YAML: `norm_preserving: true`. Like the plain form it edits every layer, and it is refused for models
with norms after each sub-layer (Gemma 2/3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from .base import register_kind
from .orthogonalization import Orthogonalization, OrthogonalizationKind


@dataclass(frozen=True)
class NormPreserving(Orthogonalization):
    kind: ClassVar[str] = "norm_preserving"

    def weights(self, model, device) -> contextlib.AbstractContextManager:
        from ..orthogonalize import orthogonalized

        return orthogonalized(model, self.direction.to(device), keep_norms=True)


@register_kind
class NormPreservingKind(OrthogonalizationKind):
    """The plain kind's cells, settings and checks (no ablation layer range beside it), its own edit."""

    name = "norm_preserving"
    label = "norm-preserving orthogonalization"
    edit_class = NormPreserving

    @classmethod
    def edit(cls, target, coefficient, params) -> NormPreserving:
        return NormPreserving(direction=target.direction)
