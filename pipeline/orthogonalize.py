"""Directional ablation baked into the weights (Arditi et al., "weight orthogonalisation").

Activation ablation (`pipeline.interventions`, kind "ablation") edits x <- x - (x . u) u
on the embedding output and on every writer's output. When a writer's output is the
output of one affine map y = W z + b, then (I - u u^T)(W z + b) = W' z + b' with
W' = (I - u u^T) W and b' = (I - u u^T) b, so orthogonalising the input embedding,
every attention output projection and every MLP down projection gives a model that,
with no hooks at all, computes the same logits as the original under activation
ablation (up to rounding), and can be saved and served like any other checkpoint.

Gemma 2/3 normalise each sub-layer output (post_attention_layernorm,
post_feedforward_layernorm) before adding it to the residual. The norm's elementwise
scale g maps a vector orthogonal to u to one that in general is not (g * x . u != 0),
so there the weight form is not exact; `orthogonalize` refuses such models unless
told `allow_inexact=True`.

`orthogonalize` edits for good; `with orthogonalized(model, direction):` edits for the
duration of a block and restores the model exactly, copying only the edited parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .architecture import _ATTN_NAMES, _MLP_NAMES, get_path, residual_map

POST_NORM_WRITERS = ("post_attention_layernorm", "post_feedforward_layernorm")
_BLOCK_ELEMENTS = 2**22  # per float64 temporary: 32 MiB


def orthogonalize(model: torch.nn.Module, direction: torch.Tensor, *, allow_inexact: bool = False,
                  keep_norms: bool = False) -> None:
    """Project the unit direction out of every weight that writes into the residual stream, in place.

    `keep_norms`: each vector written into the stream (an embedding row, the output-space vector of a
    projection's input unit, a bias) is then scaled back to its original norm: the norm-preserving edit
    (grimjim's biprojected abliteration in llm-abliteration's per-written-vector form). It is still
    orthogonal to the direction, but no longer equal to activation ablation.

    Permanent: also unties a tied lm_head for good. To edit temporarily, use `orthogonalized`.
    """
    edit = _plan(model, direction, allow_inexact, keep_norms)
    _untie_output_embeddings(model, edit.embed)
    _apply(edit)


@contextmanager
def orthogonalized(model: torch.nn.Module, direction: torch.Tensor, *,
                   allow_inexact: bool = False, keep_norms: bool = False) -> Iterator[torch.nn.Module]:
    """Orthogonalise the model's weights for the duration of a with-block, then restore them exactly.

        with orthogonalized(model, direction):
            ...  # model computes as under activation ablation, with no hooks

    Same edit and same errors (raised before anything changes) as `orthogonalize`. Only the
    edited parameters are copied (input embedding, attention output and MLP down projection
    weights and biases), not the whole state dict. On exit, also when the block raises, every
    parameter is restored bit for bit, a tied lm_head is tied to the embedding again (the same
    Parameter object) and the tie flags in the configs are as before. Yields the model.
    """
    edit = _plan(model, direction, allow_inexact, keep_norms)
    saved = [(p, p.detach().clone()) for p in edit.parameters()]
    # A tied head must keep the original embedding: reuse the saved copy instead of cloning it again.
    retie = _untie_output_embeddings(model, edit.embed, head_weight=saved[0][1])
    try:
        _apply(edit)
        yield model
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)
        retie()


@dataclass
class _Edit:
    u: torch.Tensor  # unit direction, float64
    embed: torch.nn.Module
    projections: list[torch.nn.Module]
    keep_norms: bool = False  # scale each written vector back to its norm before the projection

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the edit writes, each once (the embedding weight first)."""
        params = [self.embed.weight]
        for proj in self.projections:
            params += [proj.weight] + ([proj.bias] if proj.bias is not None else [])
        return list({id(p): p for p in params}.values())


def _plan(model: torch.nn.Module, direction: torch.Tensor, allow_inexact: bool, keep_norms: bool = False) -> _Edit:
    """Validate the direction and find every module to edit, changing nothing."""
    rmap = residual_map(model)
    direction = torch.as_tensor(direction).detach()
    if direction.shape != (rmap.hidden_size,):
        raise ValueError(f"direction has shape {tuple(direction.shape)}, "
                         f"the model's hidden size is {rmap.hidden_size}")
    u = direction.to(torch.float64)
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("direction must be finite and non-zero")
    writer_names = _writer_names(model, rmap, allow_inexact)
    return _Edit(u=u / norm, embed=get_path(model, rmap.embed),
                 projections=_output_projections(model, rmap, writer_names), keep_norms=keep_norms)


def _writer_names(model, rmap, allow_inexact: bool) -> tuple[str, ...]:
    if tuple(rmap.writers) != POST_NORM_WRITERS:
        return tuple(rmap.writers)
    if not allow_inexact:
        raise ValueError(
            f"{type(model).__name__}: weight orthogonalisation is not exact for this model: each sub-layer "
            f"output passes through a norm ({', '.join(POST_NORM_WRITERS)}) before it is added to the "
            "residual stream, and the norm's elementwise scale re-introduces the direction. Use activation "
            "ablation (pipeline.interventions), or pass allow_inexact=True to orthogonalise the attention "
            "output and MLP down projections anyway.")
    # The projections feeding the post-sub-layer norms: inside the attention and MLP modules.
    block = get_path(model, rmap.layers)[0]
    children = dict(block.named_children())
    attn = next((n for n in _ATTN_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    if attn is None or mlp is None:
        raise ValueError(f"{type(block).__name__}: cannot find attention and MLP sub-modules")
    return attn, mlp


def _apply(edit: _Edit) -> None:
    with torch.no_grad():
        _project_out_of_rows(edit.embed.weight, edit.u, edit.keep_norms)  # each embedding row e <- e - (e . u) u
        for proj in edit.projections:
            _orthogonalize_projection(proj, edit.u, edit.keep_norms)


def _orthogonalize_projection(proj: torch.nn.Module, u: torch.Tensor, keep_norms: bool = False) -> None:
    # Conv1D computes x @ W + b with W stored [in, out]: W <- W (I - u u^T), i.e. each row.
    # nn.Linear computes x @ W^T + b with W stored [out, in]: W <- (I - u u^T) W, i.e. each column.
    _project_out_of_rows(proj.weight if isinstance(proj, Conv1D) else proj.weight.T, u, keep_norms)
    if proj.bias is not None:
        _project_out_of_rows(proj.bias.unsqueeze(0), u, keep_norms)


def _project_out_of_rows(w: torch.Tensor, u: torch.Tensor, keep_norms: bool = False) -> None:
    """Each row r of the 2-D view w <- r - (r . u) u (then times |r| / |r - (r . u) u| with `keep_norms`;
    a row along u alone becomes zero), computed in float64, written back in place."""
    uu = u.to(w.device)
    # A block of rows at a time: the float64 temporaries of a whole embedding would be
    # several times the size of the weight itself (~3 x 4 GB for an 8B model's).
    for rows in w.split(max(1, _BLOCK_ELEMENTS // w.shape[1])):
        r64 = rows.to(torch.float64)
        out = r64 - torch.outer(r64 @ uu, uu)
        if keep_norms:
            after = out.norm(dim=1, keepdim=True)
            out = out * torch.where(after > 0, r64.norm(dim=1, keepdim=True) / after.clamp_min(1e-300), 0.0)
        rows.copy_(out.to(rows.dtype))


def _out_features(module: torch.nn.Module) -> int | None:
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, Conv1D):
        return module.nf
    return None


def _output_projections(model, rmap, writer_names) -> list[torch.nn.Module]:
    """Per block and writer, the linear whose output *is* the writer's output.

    Module names vary (o_proj, dense, c_proj, down_proj, dense_4h_to_h, ...), and
    q_proj or up_proj can have the hidden size as output too, so instead of guessing
    from names this runs one short forward pass and records, inside each writer, the
    linears in the order they are called. The last one with the hidden size as output
    must produce exactly the writer's output; otherwise (a mixture of experts, a gate
    or scale applied after the projection, ...) the weight form would not match the
    activation edit, and this refuses.
    """
    hidden = rmap.hidden_size
    blocks = list(get_path(model, rmap.layers))
    calls: dict[tuple[int, str], list] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def first(value):
        return value[0] if isinstance(value, tuple) else value

    for i, block in enumerate(blocks):
        for name in writer_names:
            writer = getattr(block, name)
            key = (i, name)
            calls[key] = []
            for sub in writer.modules():
                if _out_features(sub) == hidden:
                    handles.append(sub.register_forward_hook(
                        lambda m, _a, out, key=key: calls[key].append((m, out.detach().clone()))))
            handles.append(writer.register_forward_hook(
                lambda _m, _a, out, key=key: outputs.__setitem__(key, first(out).detach().clone())))

    # Eval mode so dropout cannot make the outputs differ; restore each module's flag after.
    modes = {m: m.training for m in model.modules()}
    device = get_path(model, rmap.embed).weight.device
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    found = []
    for (i, name), seen in calls.items():
        where = f"{type(model).__name__}: block {i}, {name}"
        if (i, name) not in outputs:
            raise ValueError(f"{where} was not called in a forward pass")
        if not seen:
            raise ValueError(f"{where}: no nn.Linear (or Conv1D) with {hidden} outputs inside it")
        proj, out = seen[-1]
        if out.shape != outputs[(i, name)].shape or not torch.equal(out, outputs[(i, name)]):
            raise ValueError(f"{where}: the output of its last {hidden}-output linear ({type(proj).__name__}) is "
                             "not the module's output, so orthogonalising weights would not match activation "
                             "ablation")
        found.append(proj)
    return found


def _untie_output_embeddings(model, embed, head_weight: torch.Tensor | None = None) -> Callable[[], None]:
    """Give the output embedding its own weight (`head_weight`, else a clone); return a function that re-ties them.

    The unembedding reads the stream; it must keep the direction, so untie before editing the embedding.
    """
    head = model.get_output_embeddings()
    shared = head is not None and (head.weight is embed.weight
                                   or head.weight.data_ptr() == embed.weight.data_ptr())
    flags, mappings = [], []
    # Forget the tie everywhere transformers records it, so that neither tie_weights()
    # (recomputing from the config or reusing the cached mapping) nor save/load re-ties them.
    for m in model.modules():
        if not isinstance(m, PreTrainedModel):
            continue
        for cfg in (m.config, m.config.get_text_config()):
            if getattr(cfg, "tie_word_embeddings", False):
                flags.append((cfg, cfg.tie_word_embeddings))
                cfg.tie_word_embeddings = False
        tied = getattr(m, "all_tied_weights_keys", None)
        if tied:
            mappings.append((m, tied))
            m.all_tied_weights_keys = {k: v for k, v in tied.items()
                                       if not (_is_param(m, k, embed.weight) or _is_param(m, v, embed.weight))}
    original_head = head.weight if shared else None
    if shared:
        own = head.weight.detach().clone() if head_weight is None else head_weight
        head.weight = torch.nn.Parameter(own, requires_grad=original_head.requires_grad)

    def retie() -> None:
        for cfg, value in flags:
            cfg.tie_word_embeddings = value
        for m, tied in mappings:
            m.all_tied_weights_keys = tied
        if shared:
            head.weight = original_head

    return retie


def _is_param(module, name: str, param) -> bool:
    try:
        return module.get_parameter(name) is param
    except (AttributeError, KeyError):
        return False
