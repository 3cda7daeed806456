"""The refusal effects on the embedded Qwen2.5-Coder-0.5B-Instruct (real weights, CPU)."""

import polars as pl
import pytest
import torch

from pipeline import activations, directions, prompts
from pipeline.config import load_experiment
from pipeline.generate import generate
from pipeline.interventions import Intervention
from pipeline.models import PREPARED, LoadedModel, prepare
from pipeline.score import is_refusal

from conftest import ROOT

MODEL = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen():
    # the configured direction (layer 14, last position), as the foundation experiment uses it
    exp = load_experiment([f"experiment.models=[{MODEL}]", f"+experiment.direction.force=[{{model:{MODEL},layer:14,position:-1}}]"])
    spec = exp.models[MODEL]
    prepared = ROOT / "results" / "models" / MODEL  # the pipeline's own cache of the dequantized model
    if not (prepared / PREPARED).exists():
        prepare(spec, prepared)
    return exp, LoadedModel(spec, prepared, device="cpu", threads=2)


def rate(completions, scorer):
    return sum(is_refusal(c, scorer) for c in completions) / len(completions)


@pytest.mark.slow
def test_ablation_and_addition_move_refusals(qwen):
    exp, lm = qwen
    table = pl.from_arrow(prompts.build_prompts(exp))
    train = table.filter(pl.col("split") == "train")
    acts = activations.capture(lm, train["instruction"].to_list(), batch_size=16)
    harmful = (train["label"] == "harmful").to_numpy()
    layer, position, _ = exp.direction_choice(MODEL)
    diff = (acts[harmful, layer, position].astype("float64").mean(0)
            - acts[~harmful, layer, position].astype("float64").mean(0))
    direction = torch.tensor(diff, dtype=torch.float32)

    test = table.filter(pl.col("split") == "test")
    harmful_test = test.filter(pl.col("label") == "harmful")["instruction"].to_list()[:24]
    harmless_test = test.filter(pl.col("label") == "harmless")["instruction"].to_list()[:24]
    n = 12
    gen = lambda texts, iv: generate(lm, texts, iv, max_new_tokens=n, batch_size=24)  # noqa: E731

    base_harmful = rate(gen(harmful_test, Intervention("baseline")), exp.scorer)
    ablated_harmful = rate(gen(harmful_test, Intervention("ablation", direction=direction)), exp.scorer)
    base_harmless = rate(gen(harmless_test, Intervention("baseline")), exp.scorer)
    added_harmless = rate(gen(harmless_test, Intervention("addition", direction=direction, layer=layer,
                                                          coefficient=3.0)), exp.scorer)
    random_dir = torch.tensor(directions.random_like(diff, 0), dtype=torch.float32)
    random_harmless = rate(gen(harmless_test, Intervention("addition", direction=random_dir, layer=layer,
                                                           coefficient=3.0)), exp.scorer)
    print(f"harmful {base_harmful:.2f} -> ablated {ablated_harmful:.2f}; harmless {base_harmless:.2f} -> "
          f"added {added_harmless:.2f} (random direction {random_harmless:.2f})")
    assert base_harmful >= 0.1  # the chat model refuses some harmful requests
    assert ablated_harmful < base_harmful and ablated_harmful <= 0.1
    assert base_harmless <= 0.1
    assert added_harmless >= base_harmless + 0.3
    assert random_harmless < added_harmless - 0.3  # a random direction of the same norm does not do it
