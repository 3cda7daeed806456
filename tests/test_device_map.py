"""Models larger than one GPU: the model YAML's device_map, tested on the CPU.

With no GPU here, "auto" places everything on the CPU; a map that puts blocks (or the embedding)
on "disk" is what makes accelerate attach its hooks, which load each offloaded module's weights
for its forward pass and move activations to its execution device, as they do between GPUs. The
interventions must go through those hooks unchanged: same greedy tokens as the plain model.
"""


import pytest
import torch

from pipeline.architecture import get_path
from pipeline.config import load_model
from pipeline.errors import ConfigError
from pipeline.generate import generate
from pipeline.interventions import Edit, make_edit
from pipeline.models import LoadedModel, placement_kwargs
from pipeline.specs import ModelSpec, from_params, to_params
from tests.conftest import assert_one_line_error, tiny_spec

TEXTS = ["Write a poem about cats.", "How do I bake sourdough bread at home?", "Explain gravity."]
ON_CPU = {"model.rotary_emb": "cpu", "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
          "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}


def load_placed(tiny_dirs, **placement):
    spec = tiny_spec("tiny-chat").model_copy(update=placement)
    return LoadedModel(spec, tiny_dirs["tiny-chat"], device="cpu", threads=2)


def every_kind(lm):
    d = 4 * torch.randn(lm.rmap.hidden_size, generator=torch.Generator().manual_seed(0))
    return [Edit(), make_edit("ablation", direction=d),
            make_edit("addition", direction=d, layer=1, coefficient=2.0),
            make_edit("ablation", direction=d, layers=(1, 3))]


def greedy(lm):
    return [generate(lm, TEXTS, iv, max_new_tokens=6, batch_size=3, return_ids=True)[1] for iv in every_kind(lm)]


def test_auto_loads_and_generates_what_the_plain_load_does(tiny_dirs, tiny_chat):
    placed = load_placed(tiny_dirs, device_map="auto")
    assert {p.device.type for p in placed.hf.parameters()} == {"cpu"}  # no GPU here: one device, no hooks
    assert placed.device == torch.device("cpu")
    assert greedy(placed) == greedy(tiny_chat)


@pytest.mark.parametrize("offloaded", [["model.layers.1", "model.layers.2"],
                                       ["model.layers.0", "model.layers.3", "model.norm"]])
def test_blocks_offloaded_to_disk_give_the_same_edited_tokens(tiny_dirs, tiny_chat, tmp_path, offloaded):
    device_map = {**ON_CPU, **{name: "disk" for name in offloaded}}
    placed = load_placed(tiny_dirs, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    # accelerate's hooks are really in the way: offloaded weights wait on the meta device
    for name in offloaded:
        module = placed.hf.get_submodule(name)
        assert hasattr(module, "_hf_hook") and next(module.parameters()).device.type == "meta"
    assert placed.device == torch.device("cpu")  # the embedding's
    assert greedy(placed) == greedy(tiny_chat)


def test_an_offloaded_embedding_is_refused_with_one_line(tiny_dirs, tmp_path):
    """transformers' generate starts from the first weights' device, which must not be 'meta'."""
    device_map = {**ON_CPU, "model.embed_tokens": "disk", "lm_head": "disk"}
    with pytest.raises(ConfigError) as err:
        load_placed(tiny_dirs, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert_one_line_error(err, "model/tiny-chat.yaml", "device_map")


def test_interventions_see_the_offloaded_blocks_values(tiny_dirs, tiny_chat, tmp_path):
    """Block inputs and outputs under ablation through the hooks equal the plain model's."""
    import nnsight

    from pipeline.interventions.hooks import apply_nnsight
    from pipeline.templates import encode_batch

    device_map = {**ON_CPU, "model.layers.1": "disk", "model.layers.2": "disk"}
    placed = load_placed(tiny_dirs, device_map=device_map, offload_folder=str(tmp_path / "offload"))
    iv = every_kind(placed)[1]

    def record(lm):
        batch = encode_batch(lm.tok, lm.spec, TEXTS)
        with torch.no_grad(), lm.nn.trace(**lm.inputs(batch)):
            ins, outs = nnsight.save([]), nnsight.save([])
            apply_nnsight(lm.nn, lm.rmap, iv, record=(ins, outs))
            logits = lm.nn.output.logits.save()
        return [*ins, *outs, logits]

    for ours, plain in zip(record(placed), record(tiny_chat), strict=True):
        assert torch.allclose(ours, plain, atol=1e-5)
    assert len(get_path(placed.hf, placed.rmap.layers)) == 4


def test_placement_reaches_from_pretrained_through_params():
    spec = tiny_spec("tiny-chat").model_copy(update={"device_map": {"model.layers.0": 0, "lm_head": "cpu"},
                                                     "max_memory": {0: "20GiB", "cpu": "64GiB"},
                                                     "offload_folder": "~/offload"})
    again = from_params(ModelSpec, to_params(spec))  # how a job receives it: JSON turns keys into strings
    kwargs = placement_kwargs(again)
    assert kwargs["device_map"] == {"model.layers.0": 0, "lm_head": "cpu"}
    assert kwargs["max_memory"] == {0: "20GiB", "cpu": "64GiB"}
    assert not kwargs["offload_folder"].startswith("~")
    assert placement_kwargs(tiny_spec("tiny-chat")) == {}


def test_preparation_does_not_depend_on_placement():
    spec = tiny_spec("tiny-chat")
    placed = spec.model_copy(update={"device_map": "auto", "max_memory": {"cpu": "1GiB"}})
    assert to_params(placed.for_preparation()) == to_params(spec.for_preparation())
    assert to_params(placed) != to_params(spec)


def chat_with(conf_copy, text):
    path = conf_copy / "model" / "tiny-chat.yaml"
    path.write_text(path.read_text() + text)
    return load_model("tiny-chat", conf_copy, "test", "model")


def test_the_yaml_keys_reach_the_spec(conf_copy):
    spec = chat_with(conf_copy, "device_map: {model.layers.0: 0, lm_head: disk}\noffload_folder: /tmp/x\n"
                                "max_memory: {0: 10GiB, cpu: 1000000}\n")
    assert spec.device_map == {"model.layers.0": 0, "lm_head": "disk"}
    assert spec.max_memory == {0: "10GiB", "cpu": 1000000} and spec.offload_folder == "/tmp/x"


@pytest.mark.parametrize("text, key", [
    ("device_map: everywhere\n", "device_map"),
    ("device_map: {model.layers.0: gpu7}\n", "device_map.model.layers.0"),
    ("device_map: {}\n", "device_map"),
    ("device_map: {lm_head: disk}\n", "offload_folder"),
    ("max_memory: {0: 10GiB}\n", "max_memory"),
    ("device_map: auto\nmax_memory: {0: 10gb}\n", "max_memory[0]"),
    ("device_map: auto\nmax_memory: {gpu0: 10GiB}\n", "max_memory.gpu0"),
])
def test_a_bad_placement_is_one_line_naming_the_model_file_and_key(conf_copy, text, key):
    with pytest.raises(ConfigError) as err:
        chat_with(conf_copy, text)
    assert_one_line_error(err, "model/tiny-chat.yaml", key)
