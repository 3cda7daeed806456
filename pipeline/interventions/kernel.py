"""Kernel-weighted orthogonalisation (the per-layer ablation weight of heretic, p-e-w/heretic): each
block's attention output projection and MLP down projection lose a fraction w(l) of their output along
the unit direction u, W <- W - w(l) u u^T W (and b <- b - w(l) u u^T b where the projection has a bias),
with w(l) from a kernel of its own per component:

    d = |l - max_weight_position|
    w(l) = max_weight + (d / min_weight_distance) (min_weight - max_weight)   if d <= min_weight_distance
    w(l) = 0                                                                   beyond (the block is left alone)

so the weight peaks at the (possibly fractional) position, falls linearly to `min_weight` at the distance
and drops to zero past it. Weight 1 is the plain orthogonalisation of that matrix, 0 leaves it alone,
any other value scales the component by 1 - w (below 1 a part of it stays; above 1 it flips sign). The
input embedding is not edited (heretic leaves it too), so with weight 1 everywhere this is the
`orthogonalization` cell minus its embedding edit.

Differences from heretic, on purpose: the edit is the plain rank-one one on the stored weights (heretic
by default, `row_normalization: full`, edits the rows of the stored [out, in] matrix scaled to unit
norm, each row being one output coordinate's weights over all inputs, rescales each row back to its
old norm, and stores a low-rank approximation of the change as a LoRA adapter; the `norm_preserving`
kind keeps the norms of the other axis); biases get the same weighted edit (heretic edits weights
only), so the edit stays a function of each writer's output; and one direction, the cell's, serves
every layer (heretic may interpolate between, or take each layer's, directions).

YAML (one cell, `kernel`; a component left out is not edited):

    kernel:
      attn: {max_weight: 1.0, max_weight_position: 10, min_weight: 0.2, min_weight_distance: 6}
      mlp:  {max_weight: 0.8, max_weight_position: 12, min_weight: 0.0, min_weight_distance: 8}

Refused, like the plain form, for models with norms after each sub-layer (Gemma 2/3).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from ..yamlschema import Schema
from .base import Edit, InterventionKind, register_kind

COMPONENTS = ("attn", "mlp")  # the two writers of a block, in the order the block calls them


class KernelShape(Schema):
    """One component's kernel over the block indices."""

    max_weight: float  # the weight at the peak
    max_weight_position: Annotated[float, Field(ge=0)]  # a block index, fractional allowed; its upper bound
    # (n_layers - 1) is checked once the model is known (`layer_problem`)
    min_weight: float  # the weight at `min_weight_distance` from the peak
    min_weight_distance: Annotated[float, Field(gt=0)]  # in blocks; past it the weight is zero

    def weight(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        return self.max_weight + (distance / self.min_weight_distance) * (self.min_weight - self.max_weight)


class KernelSettings(Schema):
    attn: KernelShape | None = None  # the attention output projections
    mlp: KernelShape | None = None  # the MLP down projections

    @model_validator(mode="after")
    def _some(self):
        if self.attn is None and self.mlp is None:
            raise PydanticCustomError("empty", "gives neither 'attn' nor 'mlp'; give at least one component's "
                                      "kernel (or `kernel: false`)")
        return self


@dataclass(frozen=True)
class Kernel(Edit):
    kind: ClassVar[str] = "kernel"
    edits_weights: ClassVar[bool] = True
    attn: KernelShape | None = None
    mlp: KernelShape | None = None

    def shape(self, component: str) -> KernelShape | None:
        return getattr(self, component)

    def layer_weights(self, component: str, n_layers: int) -> list[float]:
        """w(l) for every block l of the component (all zero where it is not edited)."""
        shape = self.shape(component)
        return [shape.weight(layer) if shape is not None else 0.0 for layer in range(n_layers)]

    def layer_problem(self, n_layers: int) -> str | None:
        for component in COMPONENTS:
            shape = self.shape(component)
            if shape is not None and not 0 <= shape.max_weight_position <= n_layers - 1:
                return (f"kernel {component}.max_weight_position {shape.max_weight_position:g} is outside the "
                        f"blocks 0..{n_layers - 1}")
        return None

    def weights(self, model, device) -> contextlib.AbstractContextManager:
        return _kernel_edited(model, self.direction.to(device), self)

    def columns(self) -> dict:
        return {"ablation_layers": "kernel"}


@contextlib.contextmanager
def _kernel_edited(model, direction, edit: Kernel):
    """The weighted edit for a with-block, every edited parameter restored bit for bit on exit."""
    # torch and transformers load only in the jobs that edit weights, not while the DAG is built
    import torch

    from ..architecture import residual_map
    from ..orthogonalize import _plan

    rmap = residual_map(model)
    problem = edit.layer_problem(rmap.n_layers)
    if problem:
        raise ValueError(problem)
    plan = _plan(model, direction, allow_inexact=False)  # refuses post-norm writers, as the plain form does
    writers = len(COMPONENTS)
    if len(plan.projections) != rmap.n_layers * writers:
        raise ValueError(f"{type(model).__name__}: expected an attention and an MLP output projection per block, "
                         f"found {len(plan.projections)} projections in {rmap.n_layers} blocks")
    # _plan lists the projections block by block, each block's in its writers' order (attention, MLP)
    todo = []
    for j, component in enumerate(COMPONENTS):
        for layer, w in enumerate(edit.layer_weights(component, rmap.n_layers)):
            if w != 0.0:  # a zero weight is no edit: leave the matrix alone (and uncopied)
                todo.append((plan.projections[layer * writers + j], w))
    params = [p for proj, _ in todo for p in (proj.weight, proj.bias) if p is not None]
    saved = [(p, p.detach().clone()) for p in params]
    try:
        with torch.no_grad():
            for proj, w in todo:
                _weighted_projection(proj, plan.u, w)
        yield model
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


def _weighted_projection(proj, u, weight: float) -> None:
    """Each vector the projection writes into the stream (a Linear's weight column, a Conv1D's weight row,
    the bias) loses `weight` times its component along u, computed in float64, written back in place."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from ..orthogonalize import _BLOCK_ELEMENTS

    written = proj.weight if isinstance(proj, Conv1D) else proj.weight.T  # Conv1D stores [in, out]
    views = [written] + ([proj.bias.unsqueeze(0)] if proj.bias is not None else [])
    for w in views:
        uu = u.to(w.device)
        for rows in w.split(max(1, _BLOCK_ELEMENTS // w.shape[1])):  # bounded float64 temporaries
            r64 = rows.to(torch.float64)
            rows.copy_((r64 - weight * torch.outer(r64 @ uu, uu)).to(rows.dtype))


@register_kind
class KernelKind(InterventionKind):
    name = "kernel"
    label = "kernel-weighted orthogonalization"
    settings = bool | KernelSettings  # `true` is refused (check_file): a kernel has no default shape
    default = False
    edit_class = Kernel

    @classmethod
    def coefficients(cls, value) -> list[None]:
        return [None] if isinstance(value, KernelSettings) else []

    @classmethod
    def cell_params(cls, value) -> dict:
        return {"kernel": value.model_dump(mode="json") if isinstance(value, KernelSettings) else None}

    @classmethod
    def check_file(cls, values) -> None:
        if values.get(cls.name) is True:
            raise PydanticCustomError("settings", "needs the kernel's settings (attn and/or mlp: max_weight, "
                                      "max_weight_position, min_weight, min_weight_distance), not true",
                                      {"key": cls.name})

    @classmethod
    def edit(cls, target, coefficient, params) -> Kernel:
        settings = params.get("kernel")
        if settings is None:
            raise ValueError("a kernel cell needs its kernel settings (the intervention YAML's `kernel:`)")
        # lax: the params went through JSON, which may have turned 10.0 into 10
        settings = KernelSettings.model_validate(settings, strict=False)
        return Kernel(direction=target.direction, attn=settings.attn, mlp=settings.mlp)
