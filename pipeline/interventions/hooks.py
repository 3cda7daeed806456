"""An edit applied to a model: through nnsight (what the pipeline runs), and through plain forward
hooks on the bare model (the reference the tests hold it to, token for token).

Both visit the sites an `Edit` can change in the order the model computes them: the embedding's
output, then per block its input and its writers' outputs (attention and MLP). The weight edit,
if any, is the caller's (`Edit.weights`).
"""

from __future__ import annotations

import contextlib

import torch

from ..architecture import ResidualMap, get_path
from .base import Edit


def _first(value):
    """A module output is a tensor or a tuple whose first item is the hidden state."""
    return value[0] if isinstance(value, tuple) else value


def touches_activations(edit: Edit, rmap: ResidualMap) -> bool:
    return edit.last_block(rmap.n_layers) is not None


def apply_nnsight(model, rmap: ResidualMap, edit: Edit, record: tuple[list, list] | None = None,
                  read: dict | None = None) -> None:
    """Apply `edit` inside an nnsight trace body (once per generation step).

    nnsight hands out values in the order the model computes them, so this walks the model in that
    order and stops after the edit's last block. `record`, if given, is two lists that receive every
    block's input and output (the whole model is then walked). `read`, if given, maps a block index to a
    function called with that block's input as edited (COSMIC's selection reads a few layers only, so it
    need not record them all); the walk then goes on to the last block read.
    """
    last = edit.last_block(rmap.n_layers)
    read = read or {}
    if read:
        last = max(last if last is not None else -1, max(read))
    if last is None and record is None:
        return
    change = edit.at_embedding()
    if change is not None:
        emb = get_path(model, rmap.embed).output
        emb[:] = change(emb)
    for i, block in enumerate(get_path(model, rmap.layers)):
        change = edit.at_block_input(i)
        if change is not None:
            h = block.input
            h[:] = change(h)
        if i in read:
            read[i](block.input)
        if record is not None:
            record[0].append(block.input.clone())
        change = edit.at_writers(i)
        if change is not None:
            for name in rmap.writers:
                h = _first(getattr(block, name).output)
                h[:] = change(h)
        if record is not None:
            record[1].append(_first(block.output).clone())
        elif i >= last:
            break


@contextlib.contextmanager
def torch_hooks(model: torch.nn.Module, rmap: ResidualMap, edit: Edit):
    """The same edits as `apply_nnsight`, with forward hooks on the bare model (and its weight edit)."""

    def output_hook(change):
        def hook(_module, _args, output):
            h = _first(output)
            h.copy_(change(h))
        return hook

    def input_hook(change):
        def hook(_module, args, kwargs):
            if args:
                return (change(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = change(kwargs["hidden_states"])
            return args, kwargs
        return hook

    handles = []
    try:
        change = edit.at_embedding()
        if change is not None:
            handles.append(get_path(model, rmap.embed).register_forward_hook(output_hook(change)))
        for i, block in enumerate(get_path(model, rmap.layers)):
            change = edit.at_block_input(i)
            if change is not None:
                handles.append(block.register_forward_pre_hook(input_hook(change), with_kwargs=True))
            change = edit.at_writers(i)
            if change is not None:
                for name in rmap.writers:
                    handles.append(getattr(block, name).register_forward_hook(output_hook(change)))
        with edit.weights(model, next(model.parameters()).device):
            yield model
    finally:
        for h in handles:
            h.remove()
