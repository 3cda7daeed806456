import pytest
import torch

from pipeline.activations import capture
from pipeline.errors import ConfigError
from pipeline.specs import TemplateSpec
from pipeline.templates import encode, encode_batch, encode_prompt, post_instruction_ids, split_tokens

from conftest import tiny_spec


def test_post_instruction_tokens_end_every_prompt(tiny):
    spec = tiny.spec
    batch = encode_batch(tiny.tok, spec, ["Write a poem about cats.", "How do I bake bread?"])
    post = post_instruction_ids(tiny.tok, spec)
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
    from pipeline.config import TemplateSpec

    with_bos = spec.model_copy(update={"template": TemplateSpec(name="x", text="<bos>" + spec.template.text)})
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


class CharTokenizer:
    """A stub fast tokenizer: one token per character (id = code point), offsets included, except that
    "A:" is one token when the text contains "?" -- tokens after the instruction that depend on it."""

    is_fast = True
    bos_token_id = None
    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, spans, i = [], [], 0
        while i < len(text):
            n = 2 if text.startswith("A:", i) and "?" in text else 1
            ids.append(ord(text[i]) if n == 1 else 1000)
            spans.append((i, i + n))
            i += n
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = spans
        return out

    def convert_ids_to_tokens(self, ids):
        one = lambda i: "A:" if i == 1000 else chr(i)  # noqa: E731
        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def decode(self, ids):
        return "".join(self.convert_ids_to_tokens(list(ids)))


class SlowCharTokenizer(CharTokenizer):
    """The same without offsets, like a python (slow) tokenizer: the prefix comparison decides."""

    is_fast = False

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError
        return super().__call__(text)


def _char_spec(text="Q: {instruction}\nA:"):
    return tiny_spec("tiny-chat").model_copy(update={"template": TemplateSpec(name="qa", text=text), "add_bos": False})


@pytest.mark.parametrize("tok", [CharTokenizer(), SlowCharTokenizer()], ids=["offsets", "prefix"])
def test_post_instruction_tokens_come_from_the_full_prompt(tok):
    spec = _char_spec()
    p = encode(tok, spec, "Hi")
    assert p.n_post == 3 and tok.decode(p.post) == "\nA:" and p.ids == encode_prompt(tok, spec, "Hi")
    assert post_instruction_ids(tok, spec, "Hi") == p.post
    assert encode_batch(tok, spec, ["Hi", "Hello there"]).n_post == 3
    # "A:" merges into one token when the prompt has a "?": the post-instruction tokens differ
    assert encode(tok, spec, "Why?").n_post == 2
    with pytest.raises(ConfigError) as err:
        encode_batch(tok, spec, ["Hi", "Why?"])
    assert err.value.key == "template" and "'qa'" in str(err.value) and "\n" not in str(err.value)
    # a token across the end of the instruction: "A:" when the instruction ends in "A" and the suffix is ":"
    glued = _char_spec("Q? {instruction}:")
    with pytest.raises(ConfigError) as err:
        encode(tok, glued, "Plan A")
    assert err.value.key == "template" and "'qa'" in str(err.value)


def test_split_tokens_absorbs_only_whitespace():
    tok = CharTokenizer()
    for absorb in (False, True):  # "A:" is one token, the boundary inside it, and "A" is no whitespace
        with pytest.raises(ValueError):
            split_tokens(tok, "Q? A:", 4, absorb_space=absorb)
    ids, k = split_tokens(tok, "Q? A:", 3, absorb_space=True)
    assert tok.convert_ids_to_tokens(ids[k:]) == ["A:"]


def test_check_inputs_checks_every_prompt(tiny_dirs):
    import polars as pl

    from pipeline.inputs import check_inputs

    tok = CharTokenizer()
    spec = _char_spec().model_copy(update={"refusal_tokens": []})
    frame = pl.DataFrame({"instruction": ["Hi", "Why?"], "prompt_id": ["a", "b"], "dataset": ["own", "own"]})
    with pytest.raises(ConfigError) as err:
        check_inputs(tok, spec, frame, context=None)
    assert "prompt 'b' of conf/dataset/own.yaml" in str(err.value) and err.value.key == "template"
