"""Directional ablation and activation addition, through nnsight and through plain hooks.

The nnsight form is what the pipeline runs. The plain-hook form is the reference
the tests hold it to, token for token. Both apply the same two edits:

* ablation: x <- x - (x . u) u with u the unit direction, on everything written
  into the residual stream (the embedding, and each block's attention and MLP
  outputs), so the stream is orthogonal to u at every layer and every position,
  generated tokens included;
* addition: x <- x + coefficient * v at the input of one block, every position,
  where v is the raw direction or its unit vector (`normalize`). In the
  `every_write` form (the base-models post's: its hooks on resid_pre, resid_mid
  and resid_post of one layer) the same vector is also added to each of that
  block's writers' outputs, so the attention sub-layer reads c v, the MLP 2 c v
  and the stream leaving the block carries 3 c v (parallel-residual blocks: both
  sub-layers read c v, the stream still leaves with 3 c v).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .architecture import ResidualMap, get_path

KINDS = ("baseline", "ablation", "addition")
# Where an addition adds: the block's input only, or its input and every writer's output
# (config.Addition.form lists the same names; a test holds the two together).
ADDITION_FORMS = ("block_input", "every_write")


@dataclass(frozen=True)
class Intervention:
    kind: str
    direction: torch.Tensor | None = None  # raw (unnormalised) direction, [hidden]
    layer: int | None = None  # addition: the block whose input is steered
    coefficient: float = 0.0
    normalize: bool = False  # addition: add a unit vector instead of the raw direction
    layers: tuple[int, int] | None = None  # ablation: only blocks start..stop-1 (None: every block)
    addition_form: str = "block_input"  # addition: one of ADDITION_FORMS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention {self.kind!r}")
        if self.addition_form not in ADDITION_FORMS:
            raise ValueError(f"unknown addition form {self.addition_form!r} (known: {', '.join(ADDITION_FORMS)})")
        if self.kind != "baseline" and self.direction is None:
            raise ValueError(f"{self.kind} needs a direction")
        if self.kind == "addition" and self.layer is None:
            raise ValueError("addition needs a layer")

    def ablates(self, block: int) -> bool:
        return self.kind == "ablation" and (self.layers is None or self.layers[0] <= block < self.layers[1])

    def adds_to_writers(self, block: int) -> bool:
        """Whether this block's writers' outputs get the steering vector too (the `every_write` form)."""
        return self.kind == "addition" and self.addition_form == "every_write" and block == self.layer

    def ablation_start(self) -> int:
        return 0 if self.layers is None else self.layers[0]

    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()

    def steering_vector(self) -> torch.Tensor:
        v = self.unit() if self.normalize else self.direction
        return self.coefficient * v


def ablate(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    u = unit.to(device=x.device, dtype=x.dtype)
    return x - (x @ u).unsqueeze(-1) * u


def add(x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return x + vector.to(device=x.device, dtype=x.dtype)


def _first(value):
    """A module output is a tensor or a tuple whose first item is the hidden state."""
    return value[0] if isinstance(value, tuple) else value


def check_direction(iv: Intervention, rmap: ResidualMap) -> None:
    if iv.direction is not None and iv.direction.shape[-1] != rmap.hidden_size:
        raise ValueError(f"direction has size {iv.direction.shape[-1]}, the model's hidden size is {rmap.hidden_size}")
    if iv.kind == "addition" and not 0 <= iv.layer < rmap.n_layers:
        raise ValueError(f"addition layer {iv.layer} is outside 0..{rmap.n_layers - 1}")
    if iv.kind == "ablation" and iv.layers is not None and not 0 <= iv.layers[0] < min(iv.layers[1], rmap.n_layers):
        raise ValueError(f"ablation layers {iv.layers[0]}..{iv.layers[1] - 1} are outside 0..{rmap.n_layers - 1}")


# ------------------------------------------------------------------ nnsight form


def apply_nnsight(model, rmap: ResidualMap, iv: Intervention, record: tuple[list, list] | None = None) -> None:
    """Apply `iv` inside an nnsight trace body (once per generation step).

    nnsight hands out values in the order the model computes them, so this walks
    the model in that order: embedding, then each block's input, writers, output.
    `record`, if given, is two lists that receive every block's input and output.
    """
    ablating = iv.kind == "ablation"
    u = iv.unit() if ablating else None
    vec = iv.steering_vector() if iv.kind == "addition" else None
    if ablating and iv.ablation_start() == 0:
        emb = get_path(model, rmap.embed).output
        emb[:] = ablate(emb, u)
    for i, block in enumerate(get_path(model, rmap.layers)):
        if iv.kind == "addition" and i == iv.layer:
            h = block.input
            h[:] = add(h, vec)
        if ablating and i == iv.ablation_start() > 0:
            # a limited range starts by cleaning the stream it inherits
            h = block.input
            h[:] = ablate(h, u)
        if record is not None:
            record[0].append(block.input.clone())
        if iv.ablates(i):
            for name in rmap.writers:
                h = _first(getattr(block, name).output)
                h[:] = ablate(h, u)
        elif iv.adds_to_writers(i):
            for name in rmap.writers:
                h = _first(getattr(block, name).output)
                h[:] = add(h, vec)
        if record is not None:
            record[1].append(_first(block.output).clone())
        elif (iv.kind == "addition" and i >= iv.layer) or (ablating and iv.layers and i >= iv.layers[1] - 1):
            break


# ------------------------------------------------------------------ plain-hook form


@contextlib.contextmanager
def torch_hooks(model: torch.nn.Module, rmap: ResidualMap, iv: Intervention):
    """The same edits as `apply_nnsight`, with forward hooks on the bare model."""
    handles = []
    try:
        if iv.kind == "ablation":
            u = iv.unit()

            def out_hook(_module, _args, output):
                h = _first(output)
                h.copy_(ablate(h, u))

            def in_hook(_module, args, kwargs):
                if args:
                    return (ablate(args[0], u), *args[1:]), kwargs
                kwargs["hidden_states"] = ablate(kwargs["hidden_states"], u)
                return args, kwargs

            blocks = get_path(model, rmap.layers)
            if iv.ablation_start() == 0:
                handles.append(get_path(model, rmap.embed).register_forward_hook(out_hook))
            else:
                handles.append(blocks[iv.ablation_start()].register_forward_pre_hook(in_hook, with_kwargs=True))
            for i, block in enumerate(blocks):
                if iv.ablates(i):
                    for name in rmap.writers:
                        handles.append(getattr(block, name).register_forward_hook(out_hook))
        elif iv.kind == "addition":
            vec = iv.steering_vector()

            def pre_hook(_module, args, kwargs):
                if args:
                    return (add(args[0], vec), *args[1:]), kwargs
                kwargs["hidden_states"] = add(kwargs["hidden_states"], vec)
                return args, kwargs

            def write_hook(_module, _args, output):
                h = _first(output)
                h.copy_(add(h, vec))

            block = get_path(model, rmap.layers)[iv.layer]
            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if iv.adds_to_writers(iv.layer):
                for name in rmap.writers:
                    handles.append(getattr(block, name).register_forward_hook(write_hook))
        yield model
    finally:
        for h in handles:
            h.remove()
