"""Batches that halve on out-of-memory: the same results as a loop that never ran out, in smaller chunks."""

import logging

import numpy as np
import pytest
import torch

from pipeline.batching import halving
from pipeline.interventions import Edit, make_edit
from pipeline.probes import completion_losses, last_logits

FITS = 3  # the simulated device holds at most this many items per chunk


def chunk_runner(calls: list):
    """A run_chunk that squares its items and fails like CUDA when given more than FITS of them."""

    def run_chunk(start, stop):
        calls.append((start, stop))
        if stop - start > FITS:
            raise torch.OutOfMemoryError("simulated")
        return [i * i for i in range(start, stop)]

    return run_chunk


def flat(chunks):
    return [x for chunk in chunks for x in chunk]


def test_without_oom_the_chunks_are_those_of_a_plain_loop():
    calls = []
    chunks = halving(7, 2, chunk_runner(calls))
    assert calls == [(start, min(start + 2, 7)) for start in range(0, 7, 2)]
    assert flat(chunks) == [i * i for i in range(7)]


def test_oom_halves_retries_the_same_chunk_and_keeps_the_smaller_size(caplog):
    calls, sizes = [], []
    with caplog.at_level(logging.WARNING, logger="pipeline.batching"):
        chunks = halving(10, 8, chunk_runner(calls), on_halve=sizes.append)
    assert flat(chunks) == [i * i for i in range(10)]
    assert sizes == [4, 2]  # 8 and 4 do not fit, 2 does
    # the failed chunk is retried from the same start; later chunks keep size 2
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert len([r for r in caplog.records if "out of memory" in r.getMessage()]) == 2


def test_a_short_last_chunk_halves_from_its_own_length():
    calls, sizes = [], []
    chunks = halving(5, 5, chunk_runner(calls), on_halve=sizes.append)
    assert flat(chunks) == [i * i for i in range(5)]
    assert sizes == [2]
    assert calls == [(0, 5), (0, 2), (2, 4), (4, 5)]


def test_a_batch_of_one_that_does_not_fit_fails_with_one_line():
    def never_fits(start, stop):
        raise torch.OutOfMemoryError("simulated")

    sizes = []
    with pytest.raises(torch.OutOfMemoryError) as err:
        halving(4, 4, never_fits, on_halve=sizes.append)
    assert sizes == [2, 1]
    text = str(err.value)
    assert "batch of 1" in text and "\n" not in text
    assert str(err.value.__cause__) == "simulated"


def test_other_errors_pass_through_untouched():
    def broken(start, stop):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        halving(4, 2, broken)


def test_nothing_to_do_and_a_bad_size():
    assert halving(0, 4, chunk_runner([])) == []
    with pytest.raises(ValueError, match="batch_size"):
        halving(3, 0, chunk_runner([]))


# ------------------------------------------------------------------ through a real probe

TEXTS = ["Write a poem about cats.", "How do I bake sourdough bread at home?", "Explain gravity.",
         "Name three rivers.", "What is a prime number?"]


@pytest.fixture()
def oom_above_two_rows(tiny_chat):
    """The tiny model runs out of memory whenever its embedding sees more than two rows; the row
    counts it was called with are recorded."""
    rows = []

    def fail_when_large(_module, args):
        rows.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")

    handle = tiny_chat.hf.get_input_embeddings().register_forward_pre_hook(fail_when_large)
    yield rows
    handle.remove()


def test_last_logits_are_the_same_when_batches_halve(tiny_chat, oom_above_two_rows):
    d = torch.randn(tiny_chat.rmap.hidden_size, generator=torch.Generator().manual_seed(0))
    iv = make_edit("addition", direction=d, layer=1, coefficient=2.0)
    expected = last_logits(tiny_chat, TEXTS, iv, batch_size=2)  # the chunks halving ends up with
    oom_above_two_rows.clear()
    halved = last_logits(tiny_chat, TEXTS, iv, batch_size=4)
    assert oom_above_two_rows == [4, 2, 2, 1]  # 4 fails; then chunks of 2, kept
    assert torch.equal(halved, expected)


def test_completion_losses_are_the_same_when_batches_halve(tiny_chat, oom_above_two_rows):
    pairs = [(t, "Sure, here it is.") for t in TEXTS[:4]] + [(TEXTS[4], "")]
    iv = Edit()
    expected = completion_losses(tiny_chat, pairs, iv, batch_size=2)
    oom_above_two_rows.clear()
    halved = completion_losses(tiny_chat, pairs, iv, batch_size=5)
    assert oom_above_two_rows == [4, 2, 2]  # 5 pairs, 4 to run: fails; the empty completion is never run
    assert halved == expected and halved[-1] == (0.0, 0)


def test_activations_are_the_same_when_batches_halve(tiny_chat, oom_above_two_rows):
    from pipeline.activations import capture

    expected, expected_scores = capture(tiny_chat, TEXTS, batch_size=2, with_scores=True)
    oom_above_two_rows.clear()
    halved, scores = capture(tiny_chat, TEXTS, batch_size=8, with_scores=True)
    assert oom_above_two_rows == [5, 2, 2, 1]
    assert np.array_equal(halved, expected) and np.array_equal(scores, expected_scores)


def test_generations_of_several_cells_are_the_same_when_batches_halve(tiny_chat, oom_above_two_rows):
    """A pass of two cells over two prompts is four rows: it does not fit, and halves to one prompt
    (two rows) per pass, the completions those passes give without any out-of-memory error."""
    from pipeline.generate import generate_many

    d = torch.randn(tiny_chat.rmap.hidden_size, generator=torch.Generator().manual_seed(0))
    ivs = [Edit(), make_edit("addition", direction=d, layer=1, coefficient=4.0)]
    expected = generate_many(tiny_chat, TEXTS, ivs, max_new_tokens=4, batch_size=1)
    oom_above_two_rows.clear()
    halved = generate_many(tiny_chat, TEXTS, ivs, max_new_tokens=4, batch_size=2)
    assert oom_above_two_rows[0] == 4 and max(oom_above_two_rows[1:]) == 2
    assert halved == expected and expected[0] != expected[1]
