"""The export stage: a weight-edit cell as a standard Hugging Face model folder that plain transformers, in a
process that never imports this project, loads and greedily decodes to exactly the cell's completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import export
from pipeline.errors import ConfigError
from pipeline.generate import CellPlan, generate
from pipeline.interventions import make_edit
from pipeline.interventions.addition import Addition

from conftest import DAG_FIXED, ROOT, snakemake, tiny_spec

PROMPTS = ["Tell me how to make a cake", "Write a poem about the sea", "How do I pick a lock?",
           "Explain photosynthesis in one sentence", "List three prime numbers"]

# Run with `python -I` from an empty folder: no PYTHONPATH, no cwd on the path. It loads the folder with
# transformers alone, decodes greedily with the folder's own generation config, and reports whether any module
# of this project got imported on the way.
FRESH = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, max_new = sys.argv[1], int(sys.argv[2])
prompts = json.loads(sys.stdin.read())
model = AutoModelForCausalLM.from_pretrained(folder)
tok = AutoTokenizer.from_pretrained(folder)
out = []
for text in prompts:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=max_new)
    new = gen[0, enc["input_ids"].shape[1]:].tolist()
    stops = set(model.generation_config.eos_token_id or [])
    kept = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    out.append({"prompt_ids": enc["input_ids"][0].tolist(), "ids": kept,
                "text": tok.decode(kept, skip_special_tokens=True)})
project = sorted(m for m in sys.modules if m == "pipeline" or m.startswith("pipeline."))
print(json.dumps({"out": out, "project_modules": project, "dtype": str(model.dtype)}))
"""


def fresh_generate(folder: Path, prompts: list[str], max_new_tokens: int, cwd: Path) -> dict:
    """Greedy completions from `folder` in a clean interpreter that does not import this project."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, str(folder), str(max_new_tokens)],
                          input=json.dumps(prompts), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["project_modules"] == [], result["project_modules"]
    return result


def orthogonalization_plan(hidden: int) -> CellPlan:
    torch.manual_seed(7)
    edit = make_edit("orthogonalization", direction=torch.randn(hidden))
    return CellPlan(source="self", edit=edit, cell="orthogonalization", direction_model="tiny-chat",
                    extraction_layer=2, extraction_position=-1)


def test_exported_orthogonalization_generates_the_projects_tokens(tiny_chat, tiny_dirs, tmp_path):
    spec, lm = tiny_spec("tiny-chat"), tiny_chat
    plan = orthogonalization_plan(lm.rmap.hidden_size)
    max_new = 12
    with plan.edit.weights(lm.hf, lm.device):  # the generate stage's way: the weight edit around the generation
        want_texts, want_ids = generate(lm, PROMPTS, plan.edit, max_new, batch_size=8, return_ids=True)
    prompts_file = tmp_path / "generations.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), prompts_file)  # what the chat template is checked on
    out = tmp_path / "results" / "tiny" / "export" / "tiny-chat" / "orthogonalization"
    export.run(spec, str(tiny_dirs["tiny-chat"]), plan, str(out),
               info=export.Run(experiment="tiny", exp_file="conf/experiment/tiny.yaml", max_new_tokens=max_new,
                               intervention={"ablation_layers": None}),
               evidence=export.Evidence(generations=str(prompts_file)), max_shard_size="100KB")

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "chat_template.jinja", "model.safetensors.index.json"} <= names, names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded
    assert not list(out.parent.glob(".*.tmp"))
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg.get("do_sample", False) is False
    assert gen_cfg["eos_token_id"] == [lm.tok.convert_tokens_to_ids("<|im_end|>")]
    card = (out / "README.md").read_text()
    assert "orthogonalization" in card and "layer 2" in card and "position -1" in card
    assert "Refusal rates: not measured" in card and "commit" in card

    got = fresh_generate(out, PROMPTS, max_new, tmp_path / "elsewhere")
    assert got["dtype"] == "torch.float32"
    from pipeline.templates import encode_prompt
    assert [r["prompt_ids"] for r in got["out"]] == [encode_prompt(lm.tok, spec, p) for p in PROMPTS]
    assert [r["ids"] for r in got["out"]] == want_ids
    assert [r["text"] for r in got["out"]] == want_texts
    # the edit changed the model: the unedited one says something else
    assert generate(lm, PROMPTS, make_edit("baseline"), max_new, batch_size=8) != want_texts


def test_a_hook_only_cell_is_refused_in_one_line(tiny_dirs, tmp_path):
    plan = CellPlan(source="self", edit=Addition(direction=torch.ones(64), layer=2, coefficient=2.0),
                    cell="addition_2", direction_model="tiny-chat", extraction_layer=2, extraction_position=-1)
    out = tmp_path / "export" / "tiny-chat" / "addition_2"
    with pytest.raises(ConfigError) as err:
        export.run(tiny_spec("tiny-chat"), str(tiny_dirs["tiny-chat"]), plan, str(out),
                   info=export.Run(experiment="tiny", exp_file="conf/experiment/tiny.yaml", max_new_tokens=4))
    text = str(err.value)
    assert "\n" not in text and "tiny-chat/self/addition_2" in text and "not its weights" in text
    assert "orthogonalization" in text  # what to export instead
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "template").glob("*.yaml")))
def test_every_template_renders_as_a_chat_template(name):
    """The chat template written for each of the project's templates renders its text exactly (quotes, newlines
    and all), a BOS in front where the pipeline adds one."""
    import jinja2
    import yaml

    from pipeline.specs import TemplateSpec

    template = TemplateSpec(name=name, **yaml.safe_load((ROOT / "conf" / "template" / f"{name}.yaml").read_text()))
    spec = tiny_spec("tiny-chat").model_copy(update={"template": template, "add_bos": True})

    class Tok:  # renders only: needs_bos asks whether the text starts with the BOS id
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 if text.startswith("<s>") else 5]}

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # as transformers compiles chat templates
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    rendered = env.from_string(export.chat_template(spec, Tok())).render(
        messages=[{"role": "user", "content": 'a "quoted"\n instruction'}], bos_token="<s>")
    assert rendered == "<s>" + template.format('a "quoted"\n instruction')
    with pytest.raises(ValueError, match="one user message"):
        env.from_string(export.chat_template(spec, Tok())).render(
            messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], bos_token="<s>")


@pytest.mark.slow
def test_export_rule_on_the_tiny_dag_reproduces_the_cells_completions(tiny_dag, tmp_path):
    """In the tiny DAG's workdir, `export` plans only export jobs, one per weight-edit cell (the optimize study's
    generated trials among them); the tiny chat model's
    orthogonalization folder, written by its job, decodes in a fresh process to the completions its generations
    Parquet holds. (Each export job is a few seconds of imports: the test runs one, not all six.)"""
    work, out, config = tiny_dag["work"], tiny_dag["out"], tiny_dag["config"]
    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    local = ("--profile", str(ROOT / "workflow" / "profiles" / "local"))
    # targets go before --config, which takes every argument after it; paths are relative to the workdir
    addition = str((out / "export" / "tiny-chat" / "addition_2").relative_to(work))
    plan = snakemake(work, *local, "-n", "export", addition, *config)
    assert plan.returncode == 0, plan.stderr[-3000:]
    text = plan.stdout + plan.stderr
    rules = [line.split()[-1] for line in text.splitlines() if line.split()[:1] in (["rule"], ["localrule"])]
    # 2 models x (orthogonalization, norm_preserving, kernel), the kernel study's front1 and front2 of tiny-chat,
    # the hook-only cell asked for by its path (refused by its job, with no input to build first), and the
    # target: nothing upstream reruns
    assert sorted(rules) == ["export:"] + ["export_cell:"] * 9, rules
    for model in ("tiny-chat", "tiny-base"):
        for cell in ("orthogonalization", "norm_preserving", "kernel"):
            assert f"results/tiny/export/{model}/{cell}" in text, (model, cell)
    assert "results/tiny/export/tiny-chat/front1" in text and "results/tiny/export/tiny-chat/front2" in text
    assert "export/tiny-chat/ablation" not in text

    folder = out / "export" / "tiny-chat" / "orthogonalization"
    proc = snakemake(work, *local, str(folder.relative_to(work)), *config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gens = pl.read_parquet(out / "generations" / "tiny-chat" / "self" / "orthogonalization.parquet")
    max_new = 6  # conf/experiment/tiny.yaml's generation.max_new_tokens
    got = fresh_generate(folder, gens["prompt"].to_list(), max_new, tmp_path / "elsewhere")
    assert [r["text"] for r in got["out"]] == gens["completion"].to_list()
    card = (folder / "README.md").read_text()
    assert "| refusal-prefix | harmful | 4 |" in card and "first_token_kl" in card
    assert "harmful and" in card and "train prompts" in card


def test_a_tokenizers_own_chat_template_is_kept_as_original(tiny_dirs, tmp_path):
    """A hub model's tokenizer has a chat template of its own: the project's becomes the default, the model's
    stays available by name."""
    from transformers import AutoTokenizer

    from pipeline.models import load_tokenizer
    from pipeline.templates import encode_prompt

    spec = tiny_spec("tiny-chat")
    tok = load_tokenizer(spec, tiny_dirs["tiny-chat"])
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert export.save_tokenizer(tok, spec, tmp_path, PROMPTS) is None
    assert (tmp_path / "chat_template.jinja").exists()
    assert (tmp_path / "additional_chat_templates" / "original.jinja").exists()
    saved = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert saved.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        encode_prompt(tok, spec, PROMPTS[0])
    assert saved.apply_chat_template(chat, chat_template="original", tokenize=False) == f"[user] {PROMPTS[0]}\n"


@pytest.mark.slow
def test_export_rule_writes_the_optimize_studys_front1(tiny_dag, tmp_path):
    """The tiny DAG's kernel study's front1, exported by its path: the folder decodes in a fresh process to the
    completions of the front1 cell's generations Parquet, and its card names the trial, its searched values and
    the study's fixed settings, and says it was picked on val."""
    from pipeline.generate import front_trial

    work, out, config = tiny_dag["work"], tiny_dag["out"], tiny_dag["config"]
    assert tiny_dag["run"].returncode == 0, tiny_dag["run"].stderr[-3000:]
    folder = out / "export" / "tiny-chat" / "front1"
    proc = snakemake(work, "--profile", str(ROOT / "workflow" / "profiles" / "local"), str(folder.relative_to(work)),
                     *config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gens = pl.read_parquet(out / "generations" / "tiny-chat" / "optimize" / "front1.parquet")
    got = fresh_generate(folder, gens["prompt"].to_list(), 6, tmp_path / "elsewhere")  # tiny's max_new_tokens
    assert [r["text"] for r in got["out"]] == gens["completion"].to_list()

    study = out / "optimize" / "tiny-chat"
    trial = front_trial("tiny-chat", "front1", str(study / "trials.parquet"), str(study / "pareto.parquet"))
    card = (folder / "README.md").read_text()
    assert f"Trial {trial['number']} of the optimize study" in card and "(front1 of the optimize study)" in card
    searched = {name: trial[name] for name in ("attn.max_weight", "mlp.max_weight")}
    assert json.dumps(searched, sort_keys=True) in card
    assert json.dumps(DAG_FIXED, sort_keys=True) in card
    assert "Picked on the val prompts" in card and "| refusal-prefix | harmful | 4 |" in card


def test_a_hook_only_studys_front_cell_is_refused_in_one_line(tmp_path):
    """An affine study's front1, asked for by its path: its job has no input, and refuses it in one line naming
    the experiment file and the optimize block's method."""
    study = "{method:affine,params:{alpha:[-1,1]},trials:3,generate:1,models:[tiny-chat]}"
    proc = snakemake(tmp_path, "--cores", "1", "results/tiny/export/tiny-chat/front1", "--config",
                     f"overrides=experiment=tiny +experiment.optimize={study}", timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("refusal-directions: config error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "experiment/tiny.yaml: key 'optimize.method'" in lines[0], lines[0]
    assert "cell tiny-chat/optimize/front1: affine" in lines[0] and "not its weights" in lines[0]
    assert not (tmp_path / "results" / "tiny" / "optimize").exists()  # nothing upstream ran
