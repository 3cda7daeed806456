"""Every hub model in conf/model/ is exercised end to end by a tiny stand-in.

The stand-in keeps everything the YAML decides (template, BOS, refusal tokens,
direction position) and swaps the hub id for a randomly initialised model of the
same transformers class, with a small byte-level BPE tokenizer that knows the
template's special tokens. Nothing is downloaded.
"""

from __future__ import annotations

import re

import pytest
import torch

from paper_standins import tiny_configs
from pipeline.activations import capture
from pipeline.config import DEFAULT_CONF_DIR, load_model
from pipeline.generate import generate
from pipeline.interventions import Edit, make_edit
from pipeline.interventions.hooks import apply_nnsight
from pipeline.models import LoadedModel, prepare
from pipeline.refusal import refusal_token_ids
from pipeline.specs import ModelSource, RandomInit, TemplateSpec
from pipeline.templates import encode_batch, encode_prompt, post_instruction_ids

MODEL_DIR = DEFAULT_CONF_DIR / "model"
YAMLS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def _spec(name):
    return load_model(name, DEFAULT_CONF_DIR, "test", "model")


ALL_MODELS = [name for name in YAMLS if _spec(name).role != "judge"]  # judges classify, nothing steers them
JUDGES = [name for name in YAMLS if _spec(name).role == "judge"]
HUB_MODELS = [name for name in ALL_MODELS if _spec(name).source.hub is not None]

HIDDEN = 64
N_LAYERS = 3
VOCAB = 400
TEXTS = ["Write a poem about cats.", "How do I bake sourdough bread at home?"]

TINY_CONFIGS = tiny_configs(HIDDEN, N_LAYERS)
# BOS / EOS / PAD of the stand-in tokenizer, as the real family spells them (default: Gemma's).
FAMILY_TOKENS = {
    "qwen1.5-0.5b": (None, "<|endoftext|>", "<|endoftext|>"),
    "qwen1.5-0.5b-chat": (None, "<|im_end|>", "<|endoftext|>"),
    "qwen-1.8b-chat": (None, None, None),  # Qwen 1's tokenizer defines neither: the YAML's pad_token pads
    "yi-6b-chat": ("<|startoftext|>", "<|im_end|>", "<unk>"),
    "llama-7b": ("<s>", "</s>", "<unk>"),
    "vicuna-7b-v1.1": ("<s>", "</s>", "<unk>"),
    "llama-2-7b-chat": ("<s>", "</s>", "<unk>"),
    "llama-3-8b-instruct": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"),
    "pythia-12b-deduped": ("<|endoftext|>", "<|endoftext|>", "<|padding|>"),
    "pythia-12b-deduped-vicuna": ("<|endoftext|>", "<|endoftext|>", "<|padding|>"),
}
DEFAULT_TOKENS = ("<bos>", "<eos>", "<pad>")
MARKER = re.compile(r"<\|[^|<>\s]+\|>|<[^<>\s]+>")


def template_markers(text: str) -> list[str]:
    """Every <...> and <|...|> marker in a template, in order of first appearance."""
    return list(dict.fromkeys(MARKER.findall(text)))


def stand_in(spec):
    """The YAML's spec with its hub source replaced by a tiny random model of the same class."""
    arch = spec.source.architecture
    bos, eos, pad = FAMILY_TOKENS.get(spec.name, DEFAULT_TOKENS)
    specials = list(dict.fromkeys([t for t in (bos, eos, pad, spec.pad_token) if t]
                                  + template_markers(spec.template.text)))
    random_init = {"architecture": arch, "seed": 0, "vocab_size": VOCAB, "special_tokens": specials,
                   "bos": bos, "eos": eos, "pad": pad, "config": TINY_CONFIGS[arch]}
    return spec.model_copy(update={"source": ModelSource(random_init=RandomInit(**random_init), hidden_size=HIDDEN)})


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module", params=HUB_MODELS)
def zoo(request, zoo_dir):
    yaml_spec = _spec(request.param)
    spec = stand_in(yaml_spec)
    out = zoo_dir / spec.name
    prepare(spec, out)
    lm = LoadedModel(spec, out, "cpu", 1)
    return yaml_spec, lm


# ------------------------------------------------------------------ every YAML


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_yaml_loads(name):
    spec = _spec(name)
    assert spec.template.text.count("{instruction}") == 1
    assert spec.template.suffix  # post-instruction tokens exist
    assert spec.refusal_tokens and spec.direction.position < 0
    assert spec.role in ("chat", "base")


@pytest.mark.parametrize("name", JUDGES)
def test_judge_model_yaml_loads(name):
    spec = _spec(name)
    assert spec.template.suffix and spec.source.kind in ("hub", "path")


def test_zoo_covers_both_papers():
    expected = {
        "qwen1.5-0.5b": "Qwen/Qwen1.5-0.5B", "qwen1.5-0.5b-chat": "Qwen/Qwen1.5-0.5B-Chat",
        "gemma-2-9b": "google/gemma-2-9b", "gemma-2-9b-it": "google/gemma-2-9b-it",
        "llama-7b": "huggyllama/llama-7b", "vicuna-7b-v1.1": "lmsys/vicuna-7b-v1.1",
        "pythia-12b-deduped": "EleutherAI/pythia-12b-deduped",
        "pythia-12b-deduped-vicuna": "EleutherAI/pythia-12b-deduped",
        "qwen-1.8b-chat": "Qwen/Qwen-1_8B-chat", "gemma-2b-it": "google/gemma-2b-it",
        "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
        "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct", "yi-6b-chat": "01-ai/Yi-6B-Chat",
    }
    hub_ids = {name: _spec(name).source.hub for name in HUB_MODELS}
    assert {name: hub_ids.get(name) for name in expected} == expected  # more rows may follow
    # base/chat pairs share a hidden size, so a direction can transfer
    for base, chat in [("qwen1.5-0.5b", "qwen1.5-0.5b-chat"), ("gemma-2-9b", "gemma-2-9b-it"),
                       ("llama-7b", "vicuna-7b-v1.1")]:
        b, c = _spec(base), _spec(chat)
        assert (b.role, c.role) == ("base", "chat")
        assert b.source.hidden_size == c.source.hidden_size
    # the published picks of Arditi et al.
    picks = {name: (_spec(name).direction.layer, _spec(name).direction.position) for name in expected}
    assert picks["qwen-1.8b-chat"] == (15, -2) and picks["gemma-2b-it"] == (10, -2)
    assert picks["llama-2-7b-chat"] == (14, -1) and picks["llama-3-8b-instruct"] == (12, -5)
    assert picks["yi-6b-chat"] == (20, -5)
    assert _spec("qwen-1.8b-chat").trust_remote_code
    assert [n for n in expected if _spec(n).trust_remote_code] == ["qwen-1.8b-chat"]


# ------------------------------------------------------------------ tiny stand-ins


def test_residual_map(zoo):
    yaml_spec, lm = zoo
    assert type(lm.hf).__name__ == yaml_spec.source.architecture
    assert lm.rmap.n_layers == N_LAYERS
    assert lm.rmap.hidden_size == HIDDEN
    blocks = lm.hf.get_submodule(lm.rmap.layers)
    assert len(blocks) == N_LAYERS
    if yaml_spec.source.architecture == "Gemma2ForCausalLM":
        assert lm.rmap.writers == ("post_attention_layernorm", "post_feedforward_layernorm")
    for name in lm.rmap.writers:
        assert hasattr(blocks[0], name)


def test_prompts_end_with_the_post_instruction_tokens(zoo):
    yaml_spec, lm = zoo
    spec = lm.spec
    assert spec.template == yaml_spec.template
    batch = encode_batch(lm.tok, spec, TEXTS)
    post = post_instruction_ids(lm.tok, spec)
    assert batch.n_post == len(post) > 0
    for row, mask in zip(batch.input_ids.tolist(), batch.attention_mask.tolist()):
        assert row[-batch.n_post:] == post
        real = [t for t, m in zip(row, mask) if m]
        # the whole prompt decodes back to the formatted template (BOS aside)
        text = lm.tok.decode(real)
        if spec.add_bos:
            assert text.startswith(lm.tok.bos_token)
            text = text[len(lm.tok.bos_token):]
        assert text in {spec.template.format(t) for t in TEXTS}
    assert lm.tok.decode(batch.input_ids[0, -batch.n_post:]) == spec.template.suffix
    # every template marker is one special token, never split into pieces
    for marker in template_markers(spec.template.text):
        assert len(lm.tok(marker, add_special_tokens=False)["input_ids"]) == 1
    # the YAML's direction position points into the post-instruction tokens
    assert -batch.n_post <= spec.direction.position <= -1


def test_bos(zoo):
    _, lm = zoo
    spec, tok = lm.spec, lm.tok
    ids = encode_prompt(tok, spec, TEXTS[0])
    if spec.add_bos:
        assert tok.bos_token_id is not None
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        # a template that already begins with BOS does not get a second one
        with_bos = spec.model_copy(update={"template": TemplateSpec(name="x", text=tok.bos_token + spec.template.text)})
        assert encode_prompt(tok, with_bos, TEXTS[0]) == ids
    else:
        assert tok.bos_token_id is None or tok.bos_token_id not in ids
        assert ids == tok(spec.template.format(TEXTS[0]), add_special_tokens=False)["input_ids"]


def test_refusal_tokens_are_single_tokens(zoo):
    yaml_spec, lm = zoo
    ids = refusal_token_ids(lm.tok, lm.spec)
    assert len(ids) == len(yaml_spec.refusal_tokens) == len(set(ids))
    # resolved after the template, as the model emits them: " I" after "ASSISTANT:" or "[/INST] "
    assert [lm.tok.decode([i]).strip() for i in ids] == [t.strip() for t in yaml_spec.refusal_tokens]
    assert max(ids) < lm.hf.config.vocab_size


def test_one_grid_cell_runs(zoo):
    _, lm = zoo
    acts, scores = capture(lm, TEXTS, batch_size=2, with_scores=True)
    n_post = len(post_instruction_ids(lm.tok, lm.spec))
    assert acts.shape == (2, N_LAYERS, n_post, HIDDEN)
    assert scores.shape == (2,) and torch.isfinite(torch.from_numpy(scores)).all()

    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    steer = make_edit("addition", direction=direction, layer=1, coefficient=4.0)
    steered = generate(lm, TEXTS, steer, max_new_tokens=3, batch_size=2)
    baseline = generate(lm, TEXTS, Edit(), max_new_tokens=3, batch_size=2)
    assert len(steered) == len(baseline) == 2 and all(isinstance(s, str) for s in steered)
    # the greedy continuation changes, and so do the next-token logits of every prompt
    assert steered != baseline
    batch = encode_batch(lm.tok, lm.spec, TEXTS)
    with torch.no_grad():
        plain = lm.hf(**lm.inputs(batch)).logits[:, -1]
        with lm.nn.trace(**lm.inputs(batch)):
            apply_nnsight(lm.nn, lm.rmap, steer)
            pushed = lm.nn.output.logits[:, -1].save()
    assert (pushed - plain).abs().amax(-1).min() > 1e-3
