import torch

from pipeline.activations import capture
from pipeline.templates import encode_batch, encode_prompt, post_instruction_ids

from conftest import tiny_spec


def test_post_instruction_tokens_end_every_prompt(tiny):
    spec = tiny.spec
    batch = encode_batch(tiny.tok, spec, ["Write a poem about cats.", "How do I bake bread?"])
    post = post_instruction_ids(tiny.tok, spec.template)
    assert batch.n_post == len(post) > 0
    for row in batch.input_ids.tolist():
        assert row[-batch.n_post:] == post
    # the decoded post-instruction tokens are exactly the template text after {instruction}
    assert tiny.tok.decode(batch.input_ids[0, -batch.n_post:]) == spec.template.suffix


def test_left_padding_and_mask(tiny):
    batch = encode_batch(tiny.tok, tiny.spec, ["Hi.", "A much longer instruction about baking bread at home."])
    short = batch.attention_mask[0]
    assert short[0] == 0 and short[-1] == 1  # pads on the left
    assert (batch.input_ids[0][short == 0] == tiny.tok.pad_token_id).all()


def test_exactly_one_bos(tiny_dirs):
    from pipeline.models import load

    spec = tiny_spec("tiny-base")
    _, tok = load(spec, tiny_dirs["tiny-base"], "cpu")
    ids = encode_prompt(tok, spec, "Tell me a joke.")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a template that already starts with BOS does not get a second one
    from dataclasses import replace

    from pipeline.config import TemplateSpec

    with_bos = replace(spec, template=TemplateSpec("x", "<bos>" + spec.template.text))
    ids2 = encode_prompt(tok, with_bos, "Tell me a joke.")
    assert ids2.count(tok.bos_token_id) == 1 and ids2 == ids
    chat = tiny_spec("tiny-chat")
    _, ctok = load(chat, tiny_dirs["tiny-chat"], "cpu")
    assert ctok.bos_token_id is None or ctok.bos_token_id not in encode_prompt(ctok, chat, "Hi")


def test_captured_activations_are_block_inputs_at_post_positions(tiny):
    """The cache holds resid_pre at the last n_post tokens: compare with HF hidden states."""
    texts = ["Explain how rain forms.", "Write a haiku about the sea in winter."]
    acts = capture(tiny, texts, batch_size=2)
    batch = encode_batch(tiny.tok, tiny.spec, texts)
    with torch.no_grad():
        out = tiny.hf(**tiny.inputs(batch), output_hidden_states=True)
    n = batch.n_post
    assert acts.shape == (2, tiny.rmap.n_layers, n, tiny.rmap.hidden_size)
    for layer in range(tiny.rmap.n_layers):
        expected = out.hidden_states[layer][:, -n:, :].numpy()  # hidden_states[i] is block i's input
        assert abs(acts[:, layer] - expected).max() < 1e-5
