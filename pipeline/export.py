"""Stage: a weight-edit cell written as a standard Hugging Face model folder, to take away.

The cell's edit (orthogonalisation, the norm-preserving edit, the kernel-weighted edit: every kind whose
`Edit.edits_weights`) is applied to the prepared model exactly as the generate stage applies it, through
`Edit.weights`, in the dtype and on the device generation used, and the edited model is saved inside
that context: the saved weights are the ones the cell's completions came from. Beside them go the
tokenizer with the project's prompt format as its chat template, a greedy `generation_config.json` with
the pipeline's stop tokens, and a model card (`README.md`) citing the method, the direction's
provenance, the cell's measured refusal rates and KL, and the project commit. An optimize study's generated trial
(front<i>) of a weight-edit method exports the same way; its card names the trial, its searched values and the
study's fixed settings.

Hook-only kinds (ablation, addition, affine, plugins that act on hidden states) change the forward pass
while it runs, not the weights; they are refused with one line before anything is loaded.

The folder loads with plain `transformers` (tests/test_export.py checks, in a process that does not
import this project, that it greedily generates the cell's completions token for token).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from .architecture import get_path, residual_map
from .atomic import replacing_folder
from .errors import ConfigError
from .interventions import INTERVENTIONS
from .models import PREPARED, load, set_threads, stop_token_ids
from .schemas import read_parquet
from .specs import ModelSpec, Source
from .stats import wilson_interval
from .templates import REFERENCE_INSTRUCTION, encode_prompt

if TYPE_CHECKING:
    from .generate import CellPlan

ROOT = Path(__file__).resolve().parent.parent  # the project's checkout, for its commit
CARD = "README.md"


@dataclass(frozen=True)
class Evidence:
    """The files the card cites; None where the experiment did not measure it."""

    generations: str | None = None  # the cell's completions (their prompts check the chat template)
    scores: str | None = None  # the cell's scored completions: its refusal rates
    baseline_scores: str | None = None  # the model's unedited cell, for comparison
    capability: str | None = None  # the cell's KL and cross-entropies
    selected: str | None = None  # where the direction was read
    candidates: str | None = None  # the direction owner's candidates: how many prompts made it
    trials: str | None = None  # a front cell's optimize study: its trials table


@dataclass(frozen=True)
class Run:
    """What the card says about the run the cell came from."""

    experiment: str
    exp_file: str
    max_new_tokens: int
    stop_at_eos: bool = True
    intervention: dict | None = None  # the cell's settings (its generate rule's params)
    # a front cell's trial: its row of the optimize study's trials table (generate.front_trial), whose columns
    # named by intervention["params"] hold the searched values
    trial: dict | None = None


def weight_edit_kinds() -> list[str]:
    return [name for name, kind in INTERVENTIONS.items() if kind.edit_class.edits_weights]


def config_key(source: str) -> str:
    """The config key that chose a cell's method: the optimize block's for its generated trials (front<i>)."""
    return "optimize.method" if source == Source.OPTIMIZE else "interventions"


def check_exportable(kind: str, where: str, exp_file: str, key: str = "interventions") -> None:
    """Refuse a kind whose edit is not a weight edit (decided by the registry, so plugins are covered)."""
    method = INTERVENTIONS.get(kind)
    if method.edit_class.edits_weights:
        return
    name = kind if method.label == kind else f"{kind} ({method.label})"
    raise ConfigError(exp_file, key, f"cell {where}: {name} changes the hidden states "
                      "while the model runs, through hooks, not its weights, so no model folder can hold it; export "
                      f"a weight-edit cell instead ({', '.join(weight_edit_kinds())})")


def run(spec: ModelSpec, prepared_dir: str, plan: CellPlan, output: str, *, info: Run,
        evidence: Evidence = Evidence(), device: str = "cpu", threads: int = 2, max_shard_size: str = "2GB") -> None:
    """Write the cell's edited model to the folder `output` (atomically: built beside it, then renamed)."""
    where = f"{spec.name}/{plan.source}/{plan.cell}"
    check_exportable(plan.kind, where, info.exp_file, config_key(plan.source))  # before the weights load
    set_threads(threads)
    hf, tok = load(spec, prepared_dir, device)
    rmap = residual_map(hf)
    try:
        plan.edit.check(rmap)
    except ValueError as err:
        raise ConfigError(info.exp_file, "interventions", f"cell {where}: {err}") from None
    stops = sorted(stop_token_ids(hf, tok))  # before the greedy config replaces the model's own
    instructions = _instructions(evidence.generations)
    with replacing_folder(output) as tmp:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(plan.edit.weights(hf, get_path(hf, rmap.embed).weight.device))
            except ValueError as err:  # an architecture the edit refuses (norms after the writers)
                raise ConfigError(info.exp_file, "interventions", f"cell {where}: {err}") from None
            # saved inside the edit: a tied output embedding is untied there, so the head keeps the direction
            hf.generation_config = greedy_config(tok, stops)
            hf.save_pretrained(tmp, max_shard_size=max_shard_size)
        had_template = bool(tok.chat_template)
        template_note = save_tokenizer(tok, spec, tmp, instructions)
        card = model_card(spec, prepared_dir, plan, info, evidence, dtype=str(hf.dtype).removeprefix("torch."),
                          stops=[tok.convert_ids_to_tokens(i) for i in stops], template_note=template_note,
                          had_template=had_template)
        (tmp / CARD).write_text(card, encoding="utf-8")


def _instructions(generations: str | None) -> list[str]:
    """The prompts the chat template is checked on: the cell's own (the `prompt` column holds the instruction,
    before the template), and the reference one."""
    prompts = read_parquet(generations).column("prompt").to_pylist() if generations else []
    return [REFERENCE_INSTRUCTION, *dict.fromkeys(prompts)]


def greedy_config(tok, stops: list[int]):
    """Greedy decoding that stops where the pipeline's generation stops; a fresh config, so no sampling
    default of the original (temperature, top_p) is left beside do_sample=False."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, eos_token_id=stops or None, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id)


# ------------------------------------------------------------------ the prompt format as a chat template


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal: Jinja decodes literals with Python's unicode-escape, so backslashes,
    quotes and control characters are escaped and everything else stays as it is."""
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def chat_template(spec: ModelSpec, tok) -> str:
    """The project's one-turn prompt as a chat template: one user message, rendered as the template YAML's text
    around it (its post-instruction part, the assistant's turn opener, included whatever add_generation_prompt
    says: the pipeline always generates from there), with the BOS token in front where the pipeline adds one.
    Any other conversation is refused: the project defines no format for it."""
    template = spec.template
    refusal = (f"this export reproduces the one-turn prompt of refusal-directions (template {template.name}): pass "
               "exactly one user message, or use the chat template named original")
    return ("{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}"
            + _expression(f"raise_exception({jinja_string(refusal)})")
            + "{%- endif -%}"
            + (_expression("bos_token") if needs_bos(spec, tok) else "")
            + _expression(jinja_string(template.prefix))
            + _expression("messages[0]['content']")
            + _expression(jinja_string(template.suffix)))


def _expression(code: str) -> str:
    """A Jinja output tag that trims no text of its own (the literals hold every character)."""
    return "{{ " + code + " }}"


def needs_bos(spec: ModelSpec, tok) -> bool:
    """Whether the pipeline puts a BOS in front of the formatted text (templates._with_bos): add_bos, and the
    text's own tokens do not begin with it."""
    if not spec.add_bos:
        return False
    first = tok(spec.template.format(REFERENCE_INSTRUCTION), add_special_tokens=False)["input_ids"][:1]
    return first != [tok.bos_token_id]


def save_tokenizer(tok, spec: ModelSpec, folder: Path, instructions: list[str]) -> str | None:
    """Save the tokenizer with the project's template as its default chat template (the tokenizer's own, if it
    had one, kept as the template named `original`), then check the saved folder renders each instruction to
    exactly the pipeline's prompt tokens. Returns None if it does; else the problem, and the default template
    is dropped again (the card then says to pass the token ids)."""
    original = tok.chat_template
    templates = {"default": chat_template(spec, tok)}
    if isinstance(original, dict):
        templates.update({("original" if k == "default" else f"original_{k}"): v for k, v in original.items()})
    elif original:
        templates["original"] = original
    tok.chat_template = templates if len(templates) > 1 else templates["default"]
    tok.save_pretrained(folder)
    problem = template_problem(tok, spec, folder, instructions)
    if problem is not None:
        rest = {k: v for k, v in templates.items() if k != "default"}
        tok.chat_template = rest.get("original") if len(rest) == 1 else (rest or None)
        for stale in (folder / "chat_template.jinja", folder / "additional_chat_templates"):
            if stale.is_dir():
                for f in stale.iterdir():
                    f.unlink()
                stale.rmdir()
            elif stale.exists():
                stale.unlink()
        tok.save_pretrained(folder)
    return problem


def template_problem(tok, spec: ModelSpec, folder: Path, instructions: list[str]) -> str | None:
    """The first instruction whose rendering by the saved tokenizer differs from the pipeline's prompt, or None."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=spec.trust_remote_code)
    for text in instructions:
        want = encode_prompt(tok, spec, text)
        try:
            got = saved.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        except Exception as err:  # a template this tokenizer cannot render
            return f"the chat template fails ({type(err).__name__}: {err})"
        if list(got) != want:
            return (f"rendered through the chat template, {text[:40]!r} gives {len(got)} tokens, the pipeline's "
                    f"prompt {len(want)}")
    return None


# ------------------------------------------------------------------ the model card


def model_card(spec: ModelSpec, prepared_dir: str, plan: CellPlan, info: Run, evidence: Evidence, *, dtype: str,
               stops: list[str], template_note: str | None, had_template: bool) -> str:
    method = INTERVENTIONS.get(plan.kind)
    hub = spec.source.hub if spec.source.kind == "hub" else None
    front = ["---", "library_name: transformers", *([f"base_model: {hub}"] if hub else []),
             f"tags: [refusal-directions, {plan.kind}]", "---", ""]
    title = [f"# {spec.name}: {method.label} ({_cell_words(plan)})", "",
             f"The weights of `{spec.name}` with the edit of the grid cell `{spec.name}/{plan.source}/{plan.cell}` of "
             f"the experiment `{info.experiment}` ({info.exp_file}) applied, written by the `export` rule of "
             "refusal-directions. These are exactly the weights the cell's completions were generated with.", ""]
    return "\n".join([*front, *title, *_base_section(spec, prepared_dir, dtype),
                      *_method_section(plan, info, evidence), *_direction_section(plan, evidence),
                      *_measured_section(evidence), *_usage_section(spec, info, stops, template_note, had_template),
                      *_provenance_section()]) + "\n"


def _base_section(spec: ModelSpec, prepared_dir: str, dtype: str) -> list[str]:
    src = spec.source
    if src.kind == "hub":
        info = json.loads((Path(prepared_dir) / PREPARED).read_text())
        where = f"the Hugging Face hub model `{src.hub}` at commit `{info.get('revision') or src.revision}`"
    elif src.kind == "gguf_parts":
        where = (f"a GGUF file assembled from {len(src.gguf_parts)} parts (sha256 `{src.sha256}`), dequantized "
                 "to float32 by transformers")
    elif src.kind == "random_init":
        ri = src.random_init
        where = f"a randomly initialised `{ri.architecture}` (seed {ri.seed}), a test model that knows no language"
    else:
        where = f"the local folder `{src.path}`"
    return ["## Base model", "", f"- `{spec.name}` ({spec.file}): {where}.",
            f"- Saved in {dtype}, the dtype the cell was generated in.", ""]


def _cell_words(plan: CellPlan) -> str:
    return f"{plan.cell} of the optimize study" if plan.source == Source.OPTIMIZE else f"{plan.source} direction"


def _method_section(plan: CellPlan, info: Run, evidence: Evidence) -> list[str]:
    method = INTERVENTIONS.get(plan.kind)
    doc = (sys.modules[method.__module__].__doc__ or "").strip().split("\n\n")[0]
    settings = {k: v for k, v in {**(info.intervention or {}), **plan.edit.columns()}.items() if v is not None}
    name = method.label if method.label == plan.kind else f"{method.label} (`{plan.kind}`)"
    lines = ["## Method", "", f"- {name}, cell `{plan.cell}`."]
    if info.trial is not None:  # a front cell's settings are a trial's values, not the grid's
        lines += _trial_lines(plan, info.intervention or {}, info.trial, evidence.trials)
    elif settings:
        lines.append(f"- Settings: `{json.dumps(settings, sort_keys=True)}`.")
    if doc:
        lines += ["", "> " + " ".join(doc.split())]
    return lines + [""]


def _trial_lines(plan: CellPlan, study: dict, trial: dict, trials: str | None) -> list[str]:
    """A front cell's trial: its number in the optimize study, the values it searched, the study's fixed ones, and
    the val prompts it was picked on (so the test rates below are measured on prompts the study never saw)."""
    searched = {name: trial[name] for name in study.get("params", [])}
    fixed = study.get("fixed") or {}
    table = f" (`{trials}`)" if trials else ""
    of = f" of {trial['n']}" if trial.get("n") is not None else ""
    return [f"- Trial {trial['number']} of the optimize study{table}, ranked `{plan.cell}` of its complete trials: "
            "the Pareto front of harmful refusals and first-token KL first, from fewest refusals up, then the rest.",
            f"- Searched settings, this trial's values: `{json.dumps(searched, sort_keys=True)}`.",
            f"- Fixed settings, the study's: `{json.dumps(fixed, sort_keys=True)}`." if fixed
            else "- Fixed settings: none.",
            f"- Picked on the val prompts, from the study's short generations there: {trial['refusals']}{of} harmful "
            f"prompts refused, first-token KL {trial['kl']:.4g} on the harmless ones. The rates below are on the test "
            "prompts."]


def _direction_section(plan: CellPlan, evidence: Evidence) -> list[str]:
    lines = ["## Direction", "",
             f"- Taken from `{plan.direction_model}` ({_source_words(plan.source)}) at layer {plan.extraction_layer} "
             f"(the input of block {plan.extraction_layer}), post-instruction position "
             f"{plan.extraction_position} (counted from the end of the prompt)."]
    row = _selected_row(evidence.selected, plan.source)
    if row is not None:
        lines.append(f"- Method: {row.get('method') or 'random (a control of the same norm)'}; norm "
                     f"{row['norm']:.4g}.")
    counts = _prompt_counts(evidence.candidates, plan.extraction_layer, plan.extraction_position)
    if counts is not None and plan.source != "random":
        lines.append(f"- Computed from {counts[0]} harmful and {counts[1]} harmless train prompts.")
    return lines + [""]


def _source_words(source: str) -> str:
    if source in (Source.SELF, Source.OPTIMIZE):  # an optimize study edits along the model's own direction
        return "the model's own direction"
    if source == "random":
        return "a random direction, a control"
    return f"the direction of the paired model {source}"


def _selected_row(path: str | None, source: str) -> dict | None:
    if not path:
        return None
    want = "random" if source == "random" else "self"
    rows = pl.from_arrow(read_parquet(path)).filter(pl.col("source") == want).drop("direction")
    return rows.row(0, named=True) if rows.height else None


def _prompt_counts(path: str | None, layer: int | None, position: int | None) -> tuple[int, int] | None:
    if not path or "n_harmful" not in read_parquet(path).column_names:
        return None
    rows = pl.from_arrow(read_parquet(path)).filter((pl.col("layer") == layer) & (pl.col("position") == position))
    return (rows["n_harmful"][0], rows["n_harmless"][0]) if rows.height else None


def _measured_section(evidence: Evidence) -> list[str]:
    lines = ["## Measured (test prompts)", ""]
    rates = _rates(evidence.scores)
    if rates is None:
        lines += ["Refusal rates: not measured.", ""]
    else:
        base = _rates(evidence.baseline_scores) or {}
        lines += ["Refusal rate with its 95% Wilson interval, per scorer and prompt set; the unedited model beside it.",
                  "", "| scorer | prompts | n | this model | unedited |", "|---|---|---|---|---|"]
        for (scorer, label), cell in rates.items():
            lines.append(f"| {scorer} | {label} | {cell[1]} | {_rate(cell)} | "
                         f"{_rate(base[(scorer, label)]) if (scorer, label) in base else 'not measured'} |")
        lines.append("")
    lines += _capability_lines(evidence.capability)
    return lines + [""]


def _rates(path: str | None) -> dict[tuple[str, str], tuple[int, int]] | None:
    """(scorer, label) -> (refused, n) from a scores file."""
    if not path:
        return None
    df = pl.from_arrow(read_parquet(path)).group_by("scorer", "label", maintain_order=True).agg(
        pl.col("refused").sum().alias("refused"), pl.len().alias("n"))
    return {(r["scorer"], r["label"]): (int(r["refused"]), int(r["n"])) for r in df.iter_rows(named=True)}


def _rate(counts: tuple[int, int]) -> str:
    refused, n = counts
    low, high = wilson_interval(refused, n)
    return f"{refused / n:.0%} [{low:.0%}, {high:.0%}] ({refused}/{n})" if n else "no prompts"


def _capability_lines(path: str | None) -> list[str]:
    """The cell's KL to the unedited model and cross-entropies (pipeline.capability)."""
    df = pl.from_arrow(read_parquet(path)) if path else None
    if df is None or df.height == 0:
        return ["KL to the unedited model: not measured."]
    lines = ["| metric | value | n |", "|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']:.4g} | {r['n']} |" for r in df.iter_rows(named=True)]
    return ["Capability (first_token_kl and kl_tokens: KL divergence from the unedited model on harmless prompts; "
            "ce_*: cross-entropy on reference and own answers):", "", *lines]


def _usage_section(spec: ModelSpec, info: Run, stops: list[str], template_note: str | None,
                   had_template: bool) -> list[str]:
    fmt = spec.template.text.replace("{instruction}", "<instruction>")
    bos = " A BOS token goes in front (`add_bos`)." if spec.add_bos else ""
    lines = ["## Prompt format and generation", "",
             f"The pipeline prompts the model with one user turn, template `{spec.template.name}`:{bos}", "",
             "```text", fmt, "```", ""]
    if template_note is None:
        own = ("the model's own chat template is kept, named `original` (`apply_chat_template(..., "
               "chat_template=\"original\")`)" if had_template else "the original tokenizer had no chat template")
        lines += ["The tokenizer's default chat template renders exactly this for one user message (the assistant "
                  "opener included, whatever `add_generation_prompt` says) and refuses longer conversations; "
                  f"{own}."]
    else:
        lines += [f"This format cannot be expressed as a chat template for this tokenizer ({template_note}): "
                  "tokenize the text above yourself, without special tokens, and pass the ids."]
    stop_words = "stops at " + ", ".join(f"`{s}`" for s in stops) if stops else "has no stop token"
    through = "" if info.stop_at_eos else (" The cell itself decoded through EOS (`generation.stop_at_eos: false`); "
                                           "this config stops there.")
    lines += ["", f"`generation_config.json` is greedy (`do_sample: false`) and {stop_words}, as the pipeline's "
              f"generation does; the cell's completions are {info.max_new_tokens} new tokens at most.{through}", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
              'ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
              '                              return_tensors="pt", return_dict=True)',
              f"out = model.generate(**ids, max_new_tokens={info.max_new_tokens})",
              'print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    return lines


def _provenance_section() -> list[str]:
    return ["## Provenance", "", f"- refusal-directions commit: `{project_commit()}`.", ""]


def project_commit() -> str:
    """The checkout's commit, marked when it has uncommitted changes; "unknown" outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
