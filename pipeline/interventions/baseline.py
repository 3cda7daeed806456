"""The baseline: the model as it is, one cell per model, no direction."""

from __future__ import annotations

from .base import Edit, InterventionKind, register_kind


@register_kind
class Baseline(InterventionKind):
    name = "baseline"
    label = "baseline"
    settings = None
    needs_direction = False
    edit_class = Edit

    @classmethod
    def edit(cls, target, coefficient, params) -> Edit:
        return Edit()
