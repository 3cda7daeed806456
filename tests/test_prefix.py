"""prefix.edited_passes against full passes through nnsight: the same logits and block inputs, bit for bit."""

import nnsight
import pytest
import torch

from pipeline.architecture import get_path
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import apply_nnsight
from pipeline.prefix import edited_passes, first_block
from pipeline.probes import last_logits
from pipeline.templates import encode_batch

TEXTS = ["Write a poem about cats.", "How do I bake sourdough bread at home?", "Explain gravity.",
         "Name three rivers.", "What is a prime number?"]


def edits_of_every_kind(lm) -> list[Edit]:
    d = torch.randn(lm.rmap.hidden_size, generator=torch.Generator().manual_seed(0))
    n = lm.rmap.n_layers
    return ([Edit(), make_edit("ablation", direction=d), make_edit("ablation", direction=d, layers=(1, n))]
            + [make_edit("addition", direction=d, layer=a, coefficient=2.5) for a in range(n)]
            + [make_edit("addition", direction=d, layer=n // 2, coefficient=-1.0, form="every_write"),
               make_edit("addition", direction=d, layer=n - 1, coefficient=4.0, normalize=True)])


def full_pass(lm, texts, edit, batch_size, layers):
    """The nnsight pass selection ran before: logits, and block inputs at `layers` as edited, summed."""
    logits, sums = [], []
    for start in range(0, len(texts), batch_size):
        batch = encode_batch(lm.tok, lm.spec, texts[start:start + batch_size])
        with lm.nn.trace(**lm.inputs(batch), logits_to_keep=1):
            saved = nnsight.save([])
            apply_nnsight(lm.nn, lm.rmap, edit, read={l: (lambda h: saved.append(h[:, -batch.n_post:, :]))
                                                     for l in layers})
            saved.append(lm.nn.output.logits[:, -1, :])
        logits.append(saved.pop().float())
        sums.append(torch.stack([a.double().sum(0) for a in saved]))
    return torch.cat(logits), sum(sums) / len(texts)


def test_each_edit_equals_its_full_pass_bit_for_bit(tiny):
    edits = edits_of_every_kind(tiny)
    layers = [0, tiny.rmap.n_layers // 2, tiny.rmap.n_layers - 1]
    got = edited_passes(tiny, TEXTS, edits, batch_size=2, layers=layers)  # chunks of 2, 2 and 1
    assert len(got) == len(edits)
    for edit, (logits, means) in zip(edits, got):
        want_logits, want_means = full_pass(tiny, TEXTS, edit, 2, layers)
        assert torch.equal(logits, want_logits), (edit.kind, getattr(edit, "layer", None))
        assert torch.equal(means, want_means), (edit.kind, getattr(edit, "layer", None))
    # and the edits do something: each addition moves the logits off the unedited ones
    for edit, (logits, _) in zip(edits[1:], got[1:]):
        assert not torch.allclose(logits, got[0][0])


def test_per_row_reduces_what_is_kept(tiny_chat):
    edits = edits_of_every_kind(tiny_chat)[:4]
    full = edited_passes(tiny_chat, TEXTS, edits, batch_size=3)
    top = edited_passes(tiny_chat, TEXTS, edits, batch_size=3, per_row=lambda logits: logits.argmax(-1))
    for (logits, means), (tokens, _) in zip(full, top):
        assert tokens.shape == (len(TEXTS),) and torch.equal(tokens, logits.argmax(-1))
        assert means.numel() == 0
    assert torch.equal(full[3][0], last_logits(tiny_chat, TEXTS, edits[3], 3))


def test_first_block_is_where_an_edit_starts(tiny_chat):
    n = tiny_chat.rmap.n_layers
    d = torch.ones(tiny_chat.rmap.hidden_size)
    assert first_block(Edit(), n) == n
    assert first_block(make_edit("ablation", direction=d), n) == 0
    assert first_block(make_edit("ablation", direction=d, layers=(2, 3)), n) == 2
    assert first_block(make_edit("addition", direction=d, layer=3, coefficient=1.0), n) == 3
    assert first_block(make_edit("orthogonalization", direction=d), n) == 0  # a weight edit runs whole


def test_the_model_keeps_its_blocks_even_when_a_pass_fails(tiny_chat):
    blocks = get_path(tiny_chat.hf, tiny_chat.rmap.layers)
    before = list(blocks)
    bad = make_edit("addition", direction=torch.ones(tiny_chat.rmap.hidden_size + 1), layer=2, coefficient=1.0)
    with pytest.raises(RuntimeError):
        edited_passes(tiny_chat, TEXTS, [bad], batch_size=5)
    assert all(a is b for a, b in zip(blocks, before)) and len(blocks) == len(before)
    # and the model still computes what it did
    assert torch.equal(edited_passes(tiny_chat, TEXTS, [Edit()], 5)[0][0], last_logits(tiny_chat, TEXTS, Edit(), 5))


def test_halved_batches_give_the_same_scores(tiny_chat):
    """An out-of-memory chunk is retried at half the size: every edit's rows still arrive, in order."""
    rows = []

    def fail_when_large(_module, args):
        rows.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")

    edits = edits_of_every_kind(tiny_chat)[:5]
    expected = edited_passes(tiny_chat, TEXTS, edits, batch_size=2)
    handle = tiny_chat.hf.get_input_embeddings().register_forward_pre_hook(fail_when_large)
    try:
        halved = edited_passes(tiny_chat, TEXTS, edits, batch_size=4)
    finally:
        handle.remove()
    assert rows[0] == 4 and max(rows[1:]) == 2
    for (a, _), (b, _) in zip(halved, expected):
        assert torch.equal(a, b)
