"""The continuous settings of an intervention kind that the optimize stage searches, by dotted name, and how a
trial's values become that kind's edit. Config-side (no torch): the experiment's `optimize` block is checked
against it while the DAG is built.

A kind is searchable when its settings are numbers:

* `kernel`: `attn.max_weight`, `attn.max_weight_position`, `attn.min_weight`, `attn.min_weight_distance` and
  the same four under `mlp.`; a component is edited when any of its four is named, and then needs all four
  (searched in `params` or held in `fixed`);
* `affine`: `alpha`;
* `addition`: `coefficient` (the raw direction added at the selected layer's input, the grid's default form).
"""

from __future__ import annotations

from typing import Any

from .interventions import INTERVENTIONS, Target
from .interventions.kernel import COMPONENTS, KernelSettings, KernelShape

KERNEL_SETTINGS = tuple(f"{c}.{k}" for c in COMPONENTS for k in KernelShape.model_fields)
# the kinds whose cells take one number, the grid's per-cell coefficient
COEFFICIENT_SETTINGS = {"affine": "alpha", "addition": "coefficient"}


def searchable() -> dict[str, tuple[str, ...]]:
    """Kind -> the dotted setting names a study may search or fix."""
    return {"kernel": KERNEL_SETTINGS, **{k: (v,) for k, v in COEFFICIENT_SETTINGS.items()}}


def kernel_settings(values: dict[str, float]) -> KernelSettings:
    """The kernel's settings from dotted values; a component none of whose settings is named is left out."""
    nested: dict[str, dict[str, float]] = {}
    for name, value in values.items():
        component, key = name.split(".", 1)
        nested.setdefault(component, {})[key] = float(value)
    return KernelSettings.model_validate(nested, strict=False)


def settings_problem(method: str, values: dict[str, float]) -> str | None:
    """Why these values (all of a study's settings at one point) are not valid settings of the kind, or None.

    Checked at the corners of the search box while the config loads: a kernel's settings are each bounded on
    their own (a position >= 0, a distance > 0), so the corners fail exactly where some point would."""
    if method != "kernel":
        return None
    try:
        kernel_settings(values)
    except ValueError as err:  # pydantic's ValidationError: the first problem, on one line
        first = err.errors()[0] if hasattr(err, "errors") else {"loc": (), "msg": str(err)}
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return None


def edit_for(method: str, target: Target, values: dict[str, float]) -> Any:
    """The kind's edit for one trial's values (searched and fixed together)."""
    kind = INTERVENTIONS.get(method)
    if method == "kernel":
        return kind.edit(target, None, {"kernel": kernel_settings(values).model_dump(mode="json")})
    return kind.edit(target, float(values[COEFFICIENT_SETTINGS[method]]), {})
