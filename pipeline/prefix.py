"""Many edits scored on the same prompts, each pass started at the first block its edit changes.

An edit that first changes block a (an addition at block a: the sweep's cells, selection's induce
scores) leaves blocks 0..a-1 computing exactly what the unedited model computes. So one unedited pass per
prompt batch records the block inputs where the edits start, and each edit's pass then runs from its
first block: the blocks before it are stood in for by their recorded result, while the model's own
forward still builds the embedding, masks and position embeddings (cheap, and whatever the family needs).
Edits that change every block (ablation) or the weights run whole, as before.

The edits are applied with plain forward hooks (`hooks.torch_hooks`, the reference the nnsight path is
tested against token for token), on the batches `last_logits` would use, so a score equals today's full
pass through nnsight: bit for bit on CPU (tests/test_prefix.py), to float tolerance where kernels differ.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from .architecture import get_path
from .batching import halving
from .interventions import Edit
from .interventions.hooks import torch_hooks
from .models import LoadedModel
from .templates import encode_batch

PerRow = Callable[[torch.Tensor], torch.Tensor]


def first_block(edit: Edit, n_layers: int) -> int:
    """The first block whose computation `edit` changes: 0 when it changes the embedding or the weights,
    `n_layers` when it changes nothing (its logits are the unedited ones)."""
    if edit.edits_weights or edit.at_embedding() is not None:
        return 0
    last = edit.last_block(n_layers)
    if last is None:
        return n_layers
    return next((i for i in range(last + 1)
                 if edit.at_block_input(i) is not None or edit.at_writers(i) is not None), n_layers)


class _Recorded(torch.nn.Module):
    """Stands in for a block before an edit's first one: returns that first block's recorded input,
    shaped as the real block's output (a tensor, or a tuple led by one)."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextlib.contextmanager
def _started_at(blocks: torch.nn.ModuleList, start: int, hidden: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Blocks 0..start-1 replaced by the recorded input of block `start`, put back on exit."""
    real = [blocks[i] for i in range(start)]
    stand_in = _Recorded(hidden, as_tuple)
    try:
        for i in range(start):
            blocks[i] = stand_in
        yield
    finally:
        for i, block in enumerate(real):
            blocks[i] = block


@contextlib.contextmanager
def _reading(blocks: torch.nn.ModuleList, layers: list[int], into: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record the input of each block in `layers` as it arrives (after any edit made there)."""

    def reader(layer: int):
        def hook(_module, args, kwargs):
            into[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [blocks[layer].register_forward_pre_hook(reader(layer), with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _returns_tuple(blocks: torch.nn.ModuleList, into: list[bool]):
    def hook(_module, _args, output):
        into.append(isinstance(output, tuple))
    return blocks[0].register_forward_hook(hook)


@torch.no_grad()
def edited_passes(lm: LoadedModel, instructions: list[str], edits: list[Edit], batch_size: int, *,
                  per_row: PerRow | None = None, layers: list[int] = (),
                  desc: str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each edit: (per_row(last-position logits) over the prompts, [n, ...] on CPU; the mean over prompts
    of the block inputs at the post-instruction positions of `layers` as edited, [len(layers), n_post, hidden]
    float64, or an empty tensor). `per_row` (default: the float32 logits themselves) keeps memory at a score
    per prompt when there are many edits. `desc`: a progress bar over the edits, so named."""
    per_row = per_row or (lambda logits: logits)
    layers = list(layers)
    n_layers = lm.rmap.n_layers
    starts = [first_block(e, n_layers) for e in edits]
    blocks = get_path(lm.hf, lm.rmap.layers)

    def forward(batch, edit: Edit, start: int, reads: dict[int, torch.Tensor]) -> torch.Tensor:
        # blocks before `start` are stand-ins: what they would read is already in `reads`
        with torch_hooks(lm.hf, lm.rmap, edit), _reading(blocks, [l for l in layers if l >= start], reads):
            out = lm.hf(**lm.inputs(batch), logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, :].float().cpu()

    def means(reads: dict[int, torch.Tensor], n_post: int) -> torch.Tensor:
        if not layers:
            return torch.zeros(0)
        return torch.stack([reads[layer][:, -n_post:, :].double().cpu().sum(0) for layer in layers])

    def chunk(begin: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batch = encode_batch(lm.tok, lm.spec, instructions[begin:end])
        # the unedited pass: its logits, and the block inputs every edit starts from or reads
        recorded: dict[int, torch.Tensor] = {}
        shape: list[bool] = []
        if any(s > 0 for s in starts):  # edits that all start at block 0 (ablations) need no unedited pass
            wanted = sorted({s for s in starts if 0 < s < n_layers} | set(layers))
            handle = _returns_tuple(blocks, shape)
            try:
                with _reading(blocks, wanted, recorded):
                    unedited = lm.hf(**lm.inputs(batch), logits_to_keep=1,
                                     use_cache=False).logits[:, -1, :].float().cpu()
            finally:
                handle.remove()
        results = []
        for edit, start in zip(tqdm(edits, desc=desc, leave=False, disable=desc is None), starts):
            if start >= n_layers:
                logits, reads = unedited, recorded
            else:
                reads = {layer: recorded[layer] for layer in layers if layer < start}
                context = (_started_at(blocks, start, recorded[start], shape[0]) if start > 0
                           else contextlib.nullcontext())
                with context:
                    logits = forward(batch, edit, start, reads)
            results.append((per_row(logits), means(reads, batch.n_post)))
        return results

    chunks = halving(len(instructions), batch_size, chunk)
    n = len(instructions)
    return [(torch.cat([c[i][0] for c in chunks]), sum(c[i][1] for c in chunks) / n) for i in range(len(edits))]
