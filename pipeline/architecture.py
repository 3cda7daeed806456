"""Where the residual stream lives in a transformers causal LM.

Every decoder-only model in transformers has an input embedding, a ModuleList of
decoder blocks, and inside each block the modules whose outputs are added to the
residual stream ("writers"). For most families those are the attention and MLP
modules; Gemma 2/3 normalise each sub-layer's output before adding it, so there
the writers are the post-attention and post-feedforward norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTN_NAMES = ("self_attn", "attention", "attn")
_MLP_NAMES = ("mlp", "feed_forward")


@dataclass(frozen=True)
class ResidualMap:
    embed: str  # dotted path of the input embedding module
    layers: str  # dotted path of the ModuleList of decoder blocks
    writers: tuple[str, ...]  # names, inside a block, of modules added to the residual
    n_layers: int
    hidden_size: int


def residual_map(model: torch.nn.Module) -> ResidualMap:
    embed_module = model.get_input_embeddings()
    names = {m: n for n, m in model.named_modules()}
    n_layers = model.config.get_text_config().num_hidden_layers
    layers_path = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            layers_path = name
            break
    if layers_path is None:
        raise ValueError(f"{type(model).__name__}: no list of {n_layers} decoder blocks found")
    block = model.get_submodule(layers_path)[0]
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        writers = ("post_attention_layernorm", "post_feedforward_layernorm")
    else:
        attn = next((n for n in _ATTN_NAMES if n in children), None)
        mlp = next((n for n in _MLP_NAMES if n in children), None)
        if attn is None or mlp is None:
            raise ValueError(f"{type(block).__name__}: cannot find attention and MLP sub-modules")
        writers = (attn, mlp)
    hidden = model.config.get_text_config().hidden_size
    return ResidualMap(embed=names[embed_module], layers=layers_path, writers=writers,
                       n_layers=n_layers, hidden_size=hidden)


def get_path(root, path: str):
    """Walk a dotted path on a module or an nnsight envoy alike."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
