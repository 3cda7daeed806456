"""What a rule passes as params is exactly what its job rebuilds: plain data, equal specs."""

import json
from pathlib import Path

import pytest

from pipeline.interventions import INTERVENTIONS
from pipeline.config import Activations, Capability, Generation, Selection, Split, load_experiment
from pipeline.specs import (Cell, DatasetSpec, LengthSpec, ModelDirection, ModelSpec, ScorerSpec, SweepSpec,
                            cell_name_pattern, from_params, to_params)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_spec_round_trips_through_params(name):
    exp = load_experiment([f"experiment={name}"], check_models=False)
    specs = [(ModelSpec, m) for m in exp.models.values()] + [(Cell, c) for c in exp.cells()]
    # what the prepare_model rule passes: its job validates it too
    specs += [(ModelSpec, exp.model_spec(m).for_preparation()) for m in [*exp.models, *exp.judges]]
    specs += [(DatasetSpec, d) for splits in exp.dataset_splits.values()
               for pool in splits.values() for d in pool]
    specs += [(ScorerSpec, exp.scorer), (Split, exp.split), (Activations, exp.activations),
              (Selection, exp.direction.selection), (Generation, exp.generation), (Capability, exp.capability)]
    if exp.sweep is not None:
        specs.append((SweepSpec, exp.sweep))
    if exp.length is not None:
        specs.append((LengthSpec, exp.length))
    for cls, spec in specs:
        params = to_params(spec)
        json.dumps(params)  # plain data: Snakemake can compare it between runs
        assert from_params(cls, params) == spec


def test_preparation_ignores_what_prepare_does_not_read():
    exp = load_experiment(["experiment=default"], check_models=False)
    qwen = exp.models["qwen2.5-coder-0.5b-instruct"]
    edited = qwen.model_copy(update={"refusal_tokens": ["Sorry"], "direction": ModelDirection(layer=3)})
    assert to_params(edited.for_preparation()) == to_params(qwen.for_preparation())
    assert to_params(edited) != to_params(qwen)
    tiny = load_experiment(["experiment=tiny"], check_models=False).models["tiny-chat"]
    # a tiny model's tokenizer learns its refusal tokens: for it they do matter
    assert to_params(tiny.model_copy(update={"refusal_tokens": ["As"]}).for_preparation()) != \
        to_params(tiny.for_preparation())


def test_one_cell_vocabulary():
    import re

    exp = load_experiment(["experiment=tiny"], check_models=False)
    names = {c.name for c in exp.cells()}
    assert {"baseline", "ablation", "orthogonalization", "addition_2", "best1", "cell1"} <= names
    assert all(re.fullmatch(cell_name_pattern(), n) for n in names)
    name = INTERVENTIONS.get("addition").cell_name(-1.5)
    assert name == "addition_-1.5" and re.fullmatch(cell_name_pattern(), name)
    assert exp.cell("tiny-chat", "self", "addition_2") == Cell("tiny-chat", "self", "addition", 2.0)
