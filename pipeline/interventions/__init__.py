"""Interventions: what a grid cell does to the model, one module per kind.

Each kind registers itself in `INTERVENTIONS` with its YAML schema, the cells it adds to the grid
and the edit each cell runs (`base`). The built-in kinds are imported here, in the order reports
list them; an experiment's own kinds come from its `plugins:` files. The walks that apply an edit
(through nnsight, and through plain hooks for the tests) are in `hooks`, which needs torch.
"""

from .base import (INTERVENTIONS, Edit, InterventionKind, Target, ablate, add, configurable, file_schema,  # noqa: F401
                   format_coefficient, make_edit, register_kind)
from . import baseline, ablation, orthogonalization, norm_preserving, kernel, addition, affine  # noqa: F401,E402  (registers them, in this order)
