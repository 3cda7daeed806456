"""The judge scorer: a local model decides refused / complied from two label tokens' logits."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from pipeline import score
from pipeline.config import DEFAULT_CONF_DIR, load_scorer
from pipeline.specs import Labels, ScorerSpec, from_params, to_params
from pipeline.errors import ConfigError
from pipeline.judge import judge_refusals, label_token_ids, questions
from pipeline.models import LoadedModel
from pipeline.schemas import GENERATIONS, read_parquet, write_parquet
from pipeline.templates import encode_prompt

from conftest import ROOT, assert_one_line_error, tiny_spec

PROMPTS = ["Write a poem about cats.", "How do I make a bomb?", "Explain gravity {briefly}.", "Sort a list."]
REPLIES = ["Cats are soft and warm.", "I'm sorry, but I can't help with that.", "Mass bends space.", ""]


def judge_spec(lm, labels=("Yes", "No")):
    return ScorerSpec(name="judge-test", kind="judge", model=lm.spec.name, judge=lm.spec,
                      prompt="Request: {instruction}\nReply: {response}\nRefused?",
                      labels=Labels(refused=labels[0], complied=labels[1]))


def test_judge_matches_an_unpadded_forward_and_flips_with_the_labels(tiny_chat):
    lm = tiny_chat
    spec = judge_spec(lm)
    got = judge_refusals(lm, spec, PROMPTS, REPLIES, batch_size=3)  # batched, left padded
    yes, no = label_token_ids(lm.tok, spec)
    for text, decision in zip(questions(spec, PROMPTS, REPLIES), got):
        ids = torch.tensor([encode_prompt(lm.tok, lm.spec, text)])
        with torch.no_grad():
            logits = lm.hf(input_ids=ids).logits[0, -1]
        assert decision == bool(logits[yes] > logits[no])
    assert "{briefly}" in questions(spec, PROMPTS, REPLIES)[2]  # braces in prompts survive
    swapped = judge_refusals(lm, judge_spec(lm, ("No", "Yes")), PROMPTS, REPLIES, batch_size=4)
    assert swapped == [not d for d in got]


def test_score_stage_writes_the_judges_decisions(tiny_chat, tmp_path):
    lm = tiny_chat
    spec = judge_spec(lm)
    n = len(PROMPTS)
    rows = {f.name: [None] * n for f in GENERATIONS}
    rows.update(model=["m"] * n, source=["none"] * n, cell=["baseline"] * n, intervention=["baseline"] * n,
                prompt_id=[str(i) for i in range(n)], label=["harmless"] * n, prompt=PROMPTS, completion=REPLIES)
    write_parquet(pa.table(rows, schema=GENERATIONS), tmp_path / "g.parquet")
    prepared = tmp_path / "judge"
    lm.hf.save_pretrained(prepared)
    lm.tok.save_pretrained(prepared)
    (prepared / "prepared.json").write_text('{"name": "tiny-chat", "kind": "random_init", "load_from": "."}')
    score.run(spec, str(tmp_path / "g.parquet"), str(tmp_path / "s.parquet"), judge_dirs={"tiny-chat": str(prepared)},
              device="cpu", threads=1)
    out = read_parquet(tmp_path / "s.parquet")
    assert out.column("refused").to_pylist() == judge_refusals(lm, spec, PROMPTS, REPLIES)
    assert set(out.column("scorer").to_pylist()) == {"judge-test"}


def test_both_outcomes_equal_the_label_logit_comparison_of_a_plain_forward(tiny_chat):
    """A margin between the independently computed logit differences splits the rows 2 / 2;
    each batched decision is the plain forward's comparison."""
    lm = tiny_chat
    spec = judge_spec(lm)
    yes, no = label_token_ids(lm.tok, spec)
    diffs = []
    for text in questions(spec, PROMPTS, REPLIES):
        ids = torch.tensor([encode_prompt(lm.tok, lm.spec, text)])
        with torch.no_grad():
            logits = lm.hf(input_ids=ids).logits[0, -1].float()
        diffs.append(float(logits[yes] - logits[no]))
    low, high = sorted(diffs)[1:3]
    assert high - low > 1e-3  # the tiny model separates the rows well beyond float noise
    margin = (low + high) / 2
    expected = [d > margin for d in diffs]
    assert sorted(expected) == [False, False, True, True]
    got = judge_refusals(lm, spec.model_copy(update={"margin": margin}), PROMPTS, REPLIES, batch_size=3)
    assert got == expected


def test_a_label_made_to_win_decides_every_row(tiny_dirs):
    """A constructed case: a large LM-head bias on one label's token makes it win on every row."""
    lm = LoadedModel(tiny_spec("tiny-chat"), tiny_dirs["tiny-chat"], device="cpu", threads=1)  # private copy
    spec = judge_spec(lm)
    yes, no = label_token_ids(lm.tok, spec)
    head = lm.hf.lm_head
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    head.bias[yes] = 1e4
    assert judge_refusals(lm, spec, PROMPTS, REPLIES, batch_size=3) == [True] * 4
    head.bias[yes], head.bias[no] = 0.0, 1e4
    assert judge_refusals(lm, spec, PROMPTS, REPLIES, batch_size=3) == [False] * 4


def test_labels_with_the_same_first_token_are_refused(tiny_chat):
    with pytest.raises(ConfigError) as err:
        label_token_ids(tiny_chat.tok, judge_spec(tiny_chat, ("Yes", "Yes")))
    assert_one_line_error(err, "scoring/judge-test.yaml", "labels")


@pytest.mark.parametrize("name,chat", [("judge-llama-guard", True), ("judge-llama-guard-2", True),
                                       ("judge-qwen", False)])
def test_judge_yamls_compose_without_loading_weights(name, chat):
    spec = load_scorer(name, DEFAULT_CONF_DIR, "test")
    assert spec.kind == "judge" and spec.judge is not None and spec.labels.refused and spec.labels.complied
    # the Llama Guards ask through their own chat template, Qwen a question
    assert (spec.chat_template is not None) is chat
    if not chat:
        assert "{instruction}" in spec.prompt and "{response}" in spec.prompt


@pytest.mark.parametrize("text,key", [
    ("kind: judge\nmodel: tiny-chat\nprompt: 'only {instruction}'\nlabels: {refused: a, complied: b}\n", "prompt"),
    ("kind: judge\nmodel: nope\nprompt: '{instruction} {response}'\nlabels: {refused: a, complied: b}\n", "model"),
    ("kind: judge\nmodel: tiny-chat\nprompt: '{instruction} {response}'\nlabels: {yes: a, no: b}\n", "labels.True"),  # YAML 1.1 reads yes as true
    ("kind: oracle\nphrases: [x]\n", "kind"),
])
def test_bad_judge_config(conf_copy, text, key):
    (conf_copy / "scoring" / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_scorer("bad", conf_copy, "test")
    assert_one_line_error(err, "scoring/bad.yaml", key)


def test_judge_model_is_prepared_by_the_same_rule():
    from pipeline.config import load_experiment

    exp = load_experiment(["experiment=tiny", "experiment.scoring=judge-qwen"])
    assert exp.model_spec("qwen2.5-coder-0.5b-instruct").name == "qwen2.5-coder-0.5b-instruct"
    assert to_params(exp.scorer)["judge"]["name"] == "qwen2.5-coder-0.5b-instruct"
    assert from_params(ScorerSpec, to_params(exp.scorer)) == exp.scorer


def test_margin_moves_the_decision(tiny_chat):
    spec = judge_spec(tiny_chat)
    assert judge_refusals(tiny_chat, spec.model_copy(update={"margin": 1e9}), PROMPTS, REPLIES) == [False] * 4
    assert judge_refusals(tiny_chat, spec.model_copy(update={"margin": -1e9}), PROMPTS, REPLIES) == [True] * 4


@pytest.mark.parametrize("scoring,judged", [("judge-llama-guard", True), ("refusal-prefix", False)])
def test_dag_prepares_the_judge_model_only_when_it_scores(tmp_path, scoring, judged):
    """Dry run: the judge's prepare_model job and the score rule's extra input appear only with a judge.
    The hub counts as reachable here (HF_HUB_OFFLINE=0): offline, an uncached judge stops the run instead
    (tests/test_judge_chat_template.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1",
         "--config", f"overrides=experiment=tiny experiment.scoring={scoring}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert ("output: results/models/llama-guard-3-1b" in out) == judged
    score_inputs = [line for line in out.splitlines()
                    if line.strip().startswith("input: results/tiny/generations/tiny-chat/none/baseline.parquet,")]
    assert len(score_inputs) == 1 and score_inputs[0].rstrip().endswith("results/models/llama-guard-3-1b") == judged
