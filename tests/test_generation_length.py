"""generation.stop_at_eos: false decodes a fixed number of tokens through EOS, as the base-models post's code does
(its greedy loop runs max_tokens_generated steps and never stops; the text is decoded without special tokens)."""

import torch

from pipeline.config import load_experiment
from pipeline.generate import generate_many
from pipeline.interventions import Edit, make_edit
from pipeline.models import LoadedModel

from conftest import tiny_spec

PROMPTS = ["Write a poem about the sea.", "Name three colours.", "How do I bake bread?"]


def _eos_first(tiny_dirs):
    """The tiny chat model with its EOS logit raised so far that greedy decoding writes EOS at once (and again)."""
    lm = LoadedModel(tiny_spec("tiny-chat"), tiny_dirs["tiny-chat"], device="cpu", threads=2)
    eos = lm.tok.eos_token_id
    bias = torch.zeros(lm.hf.lm_head.out_features)
    bias[eos] = 1e4
    lm.hf.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)  # the same module nnsight wraps
    return lm, eos


def test_fixed_length_decodes_through_eos(tiny_dirs):
    lm, eos = _eos_first(tiny_dirs)
    assert lm.hf.generation_config.eos_token_id is not None
    (texts, ids), = generate_many(lm, PROMPTS, [Edit()], 5, 2)
    assert ids == [[], [], []] and texts == ["", "", ""]  # stopped at EOS: nothing kept
    (texts, ids), = generate_many(lm, PROMPTS, [Edit()], 5, 2, stop_at_eos=False)
    # every step decoded and kept: the model writes EOS again and again (a stopped row would be padded)
    assert ids == [[eos] * 5] * 3 and lm.tok.pad_token_id != eos
    assert texts == [lm.tok.decode(row, skip_special_tokens=True) for row in ids]
    assert lm.tok.eos_token not in texts[0]
    assert lm.hf.generation_config.eos_token_id is not None  # the model's own config restored


def test_fixed_length_with_a_steered_cell(tiny_dirs):
    """The fixed length holds for every invoke of a pass, steered ones included."""
    lm, _ = _eos_first(tiny_dirs)
    direction = torch.randn(lm.hf.config.hidden_size, dtype=torch.float64)
    ivs = [Edit(), make_edit("ablation", direction=direction)]
    out = generate_many(lm, PROMPTS, ivs, 4, 3, stop_at_eos=False)
    assert [[len(row) for row in ids] for _, ids in out] == [[4, 4, 4], [4, 4, 4]]


def test_the_base_models_experiments_decode_a_fixed_16_tokens():
    for name in ("base_models_refuse_qwen", "base_models_refuse_gemma", "base_models_refuse_llama",
                 "base_models_refuse_pythia"):
        exp = load_experiment([f"experiment={name}"], check_models=False)
        assert (exp.generation.max_new_tokens, exp.generation.stop_at_eos) == (16, False)
    assert load_experiment(["experiment=single_direction"], check_models=False).generation.stop_at_eos
