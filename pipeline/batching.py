"""Batches that shrink when they do not fit: halve on out-of-memory, retry the same items.

A batch size that fits one GPU (or one model, or one prompt length) does not fit the
next, and the only cheap way to know is to try. `halving` runs a batched loop chunk
by chunk; when a chunk raises `torch.OutOfMemoryError` (CUDA's is a subclass) it frees
the CUDA cache, halves the batch size and runs the same chunk again, and keeps the
smaller size for the rest of the loop. Without an out-of-memory error it runs exactly
the chunks `range(0, n_items, batch_size)` would, so results do not change.

    results = halving(len(prompts), batch_size, lambda start, stop: forward(prompts[start:stop]))

`run_chunk` must not change anything it cannot undo before it may fail (append its rows
to the caller's lists only after its forward pass, or return them), since a chunk that
fails is run again.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger(__name__)


def halving(n_items: int, batch_size: int, run_chunk: Callable[[int, int], T], *,
            on_halve: Callable[[int], None] | None = None) -> list[T]:
    """`run_chunk(start, stop)` over consecutive chunks of `range(n_items)`; the list of its results, in order.

    On `torch.OutOfMemoryError` the chunk is retried with half the batch size, which is kept
    for later chunks; `on_halve(new_size)` is called each time (e.g. to remember the size for
    the next loop). A chunk of one item that still does not fit raises `torch.OutOfMemoryError`
    with a one-line message (the original error as its cause).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    results: list[T] = []
    start, size = 0, batch_size
    while start < n_items:
        stop = min(start + size, n_items)
        try:
            results.append(run_chunk(start, stop))
        except torch.OutOfMemoryError as err:
            if stop - start == 1:
                raise torch.OutOfMemoryError(
                    f"out of memory with a batch of 1 (item {start} of {n_items}): this model and input "
                    f"need more memory than the device has") from err
            # leave the except block before freeing: the traceback holds the failed chunk's tensors
        else:
            start = stop
            continue
        free_cuda_cache()
        size = (stop - start) // 2
        log.warning("out of memory with a batch of %d; retrying items %d.. with batches of %d",
                    stop - start, start, size)
        if on_halve is not None:
            on_halve(size)
    return results


def free_cuda_cache() -> None:
    """Return the failed chunk's cached blocks to the device, so the smaller chunk can use them."""
    gc.collect()  # tensors caught in reference cycles (e.g. a trace's saved values) free only now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
