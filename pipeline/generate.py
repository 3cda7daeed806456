"""Stage 4: grid cells of greedy generations, steered or ablated through nnsight.

A cell is (model, direction source, intervention). It runs on the harmful and the
harmless test prompts, batched, with the KV cache, on CUDA when present. One job
runs several cells of a model, loading it once.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import torch

from . import capability, coherence
from .atomic import NonFiniteOutput
from .candidates import harmless_means, load_direction, own_target  # noqa: F401  (load_direction: callers import it here too)
from .config import Capability, resolve_data_path
from .errors import ConfigError
from .interventions import INTERVENTIONS, Edit, Target
from .interventions.ablation import Ablation
from .interventions.addition import Addition
# the decoding loop is shared with the optimize stage; its callers still import it from here
from .decoding import decode_until_stop, generate, generate_many, until_stop  # noqa: F401
from .models import LoadedModel, context_length, load_tokenizer
from .probes import completion_losses, last_logits
from .schemas import GENERATIONS, column_matrix, read_parquet, write_parquet
from .sources import model_metadata
from .search_space import edit_for
from .specs import FRONT_PREFIX, Cell, ModelSpec, Source
from .inputs import check_inputs


@dataclass(frozen=True)
class CellPlan:
    """Everything one generate job does for a cell, resolved from the grid cell or the sweep pick."""

    source: str
    edit: Edit  # what the cell does (its kind's `Edit`)
    cell: str = ""  # the cell's file name: baseline, ablation, addition_2, best1, ...
    direction_model: str | None = None
    extraction_layer: int | None = None
    extraction_position: int | None = None
    labels: tuple[str, ...] = ("harmful", "harmless")  # which test prompts
    capability: bool = True

    @property
    def kind(self) -> str:
        return self.edit.kind


def candidate_direction(candidates_path: str, layer: int, position: int) -> torch.Tensor:
    table = read_parquet(candidates_path)
    keys = list(zip(table.column("layer").to_pylist(), table.column("position").to_pylist()))
    return torch.from_numpy(column_matrix(table, "direction")[keys.index((layer, position))].copy())


def plan_cell(cell: Cell, intervention: dict, *, selected_path: str | None = None, picks_path: str | None = None,
              candidates_path: str | None = None, activations_path: str | None = None,
              trials_path: str | None = None, pareto_path: str | None = None) -> CellPlan:
    """A grid cell's or a sweep pick's plan; `intervention`: the settings the cell reads (its rule's params)."""
    if cell.source == Source.OPTIMIZE:
        return plan_front_cell(cell.model, cell.pick, intervention, selected_path=selected_path,
                               trials_path=trials_path, pareto_path=pareto_path, activations_path=activations_path)
    if cell.source == Source.SWEEP:
        layers = intervention.get("ablation_layers")
        return plan_sweep_cell(cell.model, picks_path, candidates_path, cell.pick,
                               tuple(layers) if layers else None)
    if cell.source == Source.RULE:
        return plan_rule_cell(cell.model, selected_path, candidates_path, cell.pick, intervention)
    return plan_grid_cell(selected_path, source=cell.source, kind=cell.kind, coefficient=cell.coefficient,
                          params=intervention, activations_path=activations_path)


def plan_grid_cell(selected_path: str | None, *, source: str, kind: str, coefficient: float | None = None,
                   params: dict | None = None, activations_path: str | None = None) -> CellPlan:
    """The plan of a grid cell of a registered `kind`, its direction read from `selected_path` (and, for a
    kind that reads activations, the edited model's harmless means from `activations_path`)."""
    method = INTERVENTIONS.get(kind)
    name = method.cell_name(coefficient)
    if not method.needs_direction:
        return CellPlan(source=source, edit=method.edit(None, coefficient, params or {}), cell=name)
    direction, layer, position, owner = load_direction(selected_path, source)
    means = harmless_means(activations_path, position) if method.reads_activations else None
    target = Target(direction=direction, layer=layer, position=position, model=owner, harmless_means=means)
    return CellPlan(source=source, edit=method.edit(target, coefficient, params or {}), cell=name,
                    direction_model=owner, extraction_layer=layer, extraction_position=position)


def plan_sweep_cell(model: str, picks_path: str, candidates_path: str, pick: str,
                    ablation_layers: tuple[int, int] | None) -> CellPlan:
    """A cell the sweep picked: addition cells run on harmless prompts, ablation cells on harmful ones.

    Additions keep the block_input form whatever the intervention file says: that is the form the
    sweep scored them with."""
    picks = pl.from_arrow(read_parquet(picks_path)).filter(pl.col("pick") == pick)
    if picks.height != 1:
        raise ValueError(f"{picks_path}: no pick named {pick!r}")
    r = picks.row(0, named=True)
    direction = candidate_direction(candidates_path, r["extraction_layer"], r["extraction_position"])
    addition = r["kind"] == "addition"
    if addition:
        edit = Addition(direction=direction, layer=r["addition_layer"], coefficient=r["coefficient"],
                        normalize=bool(r["normalized"]))
    else:
        edit = Ablation(direction=direction, layers=ablation_layers)
    return CellPlan(source="sweep", edit=edit, cell=pick, direction_model=model,
                    extraction_layer=r["extraction_layer"], extraction_position=r["extraction_position"],
                    labels=("harmless",) if addition else ("harmful",), capability=False)


def plan_rule_cell(model: str, selection_path: str, candidates_path: str, pick: str, params: dict) -> CellPlan:
    """Ablation of the candidate a selection rule picks (`pick`, as the selection table's `picks` column names
    it), on both labels with the capability measures, so it lines up with the grid's own ablation cell."""
    table = pl.from_arrow(read_parquet(selection_path))
    rows = table.filter(pl.col("picks").is_not_null() & pl.col("picks").str.split(",").list.contains(pick))
    if rows.height != 1:
        rule, _, cap = pick.partition("_kl")
        raise ConfigError(selection_path, "direction.generate_picks",
                          f"no candidate of {model} survives rule {rule!r}" + (f" at KL cap {cap}" if cap else "")
                          + ", so its pick cannot be generated; drop that cap from direction.selection.kl_max_compare"
                          " or loosen the rule's filters")
    r = rows.row(0, named=True)
    direction = candidate_direction(candidates_path, r["layer"], r["position"])
    target = Target(direction=direction, layer=r["layer"], position=r["position"], model=model)
    edit = INTERVENTIONS.get("ablation").edit(target, None, params)
    return CellPlan(source=Source.RULE.value, edit=edit, cell=pick, direction_model=model,
                    extraction_layer=r["layer"], extraction_position=r["position"])


def ranked_trials(trials_path: str, pareto_path: str) -> pl.DataFrame:
    """The study's complete trials in the order front1, front2, ... take them: the Pareto front from fewest
    harmful refusals up (ties: lower KL, then trial number), then the other trials in the same order."""
    front = set(pl.from_arrow(read_parquet(pareto_path))["number"].to_list())
    return (pl.from_arrow(read_parquet(trials_path)).filter(pl.col("state") == "COMPLETE")
            .with_columns(on_front=pl.col("number").is_in(list(front)))
            .sort(["on_front", "refusals", "kl", "number"], descending=[True, False, False, False]))


def front_trial(model: str, pick: str, trials_path: str, pareto_path: str) -> dict:
    """The trials table's row of the trial `pick` (front<i>) names: the i-th of `ranked_trials`."""
    ranked = ranked_trials(trials_path, pareto_path)
    index = int(pick.removeprefix(FRONT_PREFIX)) - 1
    if index >= ranked.height:
        raise ConfigError(trials_path, "optimize.generate", f"asks for {pick} of {model}'s study, which holds "
                          f"{ranked.height} complete trials; lower optimize.generate or raise optimize.trials")
    return ranked.row(index, named=True)


def plan_front_cell(model: str, pick: str, settings: dict, *, selected_path: str, trials_path: str,
                    pareto_path: str, activations_path: str | None = None) -> CellPlan:
    """The optimize study's trial `pick` names (front<i>: the i-th of `ranked_trials`): its method's edit of the
    model's own selected direction with the trial's searched settings and the study's fixed ones, on both
    labels with the capability measures, like the grid's cells. `settings`: the study's method, searched setting
    names (`params`) and `fixed` values."""
    trial = front_trial(model, pick, trials_path, pareto_path)
    method = settings["method"]
    searched = {name: trial[name] for name in settings["params"]}
    target = own_target(selected_path, activations_path, method)
    edit = edit_for(method, target, {**settings["fixed"], **searched})
    return CellPlan(source=Source.OPTIMIZE.value, edit=edit, cell=pick, direction_model=target.model,
                    extraction_layer=target.layer, extraction_position=target.position)


def hidden_size_of(prepared_dir: str) -> int | None:
    """Read the hidden size from the saved config, without loading weights."""
    cfg_path = Path(prepared_dir) / "config.json"
    if not cfg_path.exists():
        return None
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")


def run(spec: ModelSpec, prepared_dir: str, prompts_path: str, plan: CellPlan, output: str, *,
        capability_out: str | None = None, **kwargs) -> None:
    """One cell; see `run_cells`."""
    run_cells(spec, prepared_dir, prompts_path, [(plan, output, capability_out)], **kwargs)


def run_cells(spec: ModelSpec, prepared_dir: str, prompts_path: str,
              cells: list[tuple[CellPlan, str, str | None]], *, max_new_tokens: int, batch_size: int, device: str,
              threads: int, exp_file: str, capability_cfg: Capability | None = None,
              baseline_path: str | None = None, nll_prompts: int = 16, cells_per_pass: int = 1,
              stop_at_eos: bool = True) -> None:
    """Cells of one model, loading it once: per cell (plan, generations file, capability file or None),
    generate -> capability -> coherence -> write. Each cell gives what it would give alone.

    Up to `cells_per_pass` cells on the same prompts generate together, one nnsight invoke each
    (`generate_many`); weight orthogonalisation edits the model for every row, so it runs alone.
    A baseline cell among them runs first, and the others take its completions as the model's own
    answers; otherwise they read `baseline_path`. `nll_prompts`: how many prompts per label get the
    unsteered-model nll (0: none).
    """
    for plan, *_ in cells:
        check_direction_size(plan, prepared_dir, spec, exp_file)
        check_edit_layers(plan, prepared_dir, spec, exp_file)
    test = pl.from_arrow(read_parquet(prompts_path)).filter(pl.col("split") == "test")
    labels = sorted({label for plan, *_ in cells for label in plan.labels})
    tok = load_tokenizer(spec, prepared_dir)
    check_inputs(tok, spec, test.filter(pl.col("label").is_in(labels)), context_length(spec, prepared_dir),
                 max_new_tokens)
    lm = LoadedModel(spec, prepared_dir, device, threads, tokenizer=tok)
    cap = capability_cfg or Capability(enabled=False)
    harmless = test.filter(pl.col("label") == "harmless")["instruction"].to_list()[:cap.n]
    measured = [cap_out is not None and cap.enabled and plan.capability for plan, _, cap_out in cells]
    # before any weight edit: the unsteered next-token distribution the KL is taken against
    baseline_logits = last_logits(lm, harmless, Edit(), batch_size) if any(measured) else None
    baseline = pl.from_arrow(read_parquet(baseline_path)) if baseline_path else None
    answers = baseline_answers(lm, baseline, cap, batch_size) if any(measured) else None
    copies = same_pick_as(cells)  # generated once, written under each name
    unique = [i for i in range(len(cells)) if i not in copies]
    for passed in plan_passes([cells[i][0] for i in unique], cells_per_pass):
        group = [unique[k] for k in passed]
        plans = [cells[i][0] for i in group]
        prompts = test.filter(pl.col("label").is_in(list(plans[0].labels)))
        instructions = prompts["instruction"].to_list()
        ivs = [plan.edit for plan in plans]
        metrics = {i: {} for i in group}
        with edited_weights(lm, plans[0], exp_file):  # a no-op but for a lone weight edit
            for i, plan, iv in zip(group, plans, ivs):  # before the generation it would waste
                if plan.kind != "baseline":
                    # one batch: an edit that overflows does so on any prompt, and a pass per cell would cost
                    check_finite_logits(lm, plan, iv, instructions[:batch_size], batch_size, cells[i][1])
            results = dict(zip(group, generate_many(lm, instructions, ivs, max_new_tokens, batch_size,
                                                    stop_at_eos=stop_at_eos)))
            for i, plan in zip(group, plans):
                if plan.kind == "baseline":
                    baseline = pl.DataFrame({"label": prompts["label"], "prompt": instructions,
                                             "completion": results[i][0]})
                    # the baseline's pass edits no weight (a weight edit has a pass of its own)
                    answers = baseline_answers(lm, baseline, cap, batch_size) if any(measured) else None
            for i, iv in zip(group, ivs):
                if measured[i]:  # on the steered (or edited) model
                    own = own_answers(baseline, cap.n)
                    reference = capability.load_pairs(str(resolve_data_path(cap.reference)), cap.n)
                    metrics[i] = capability.measure(lm, iv, reference, own, harmless, baseline_logits, batch_size,
                                                    answers)
        for i in group:
            completions, ids = results[i]
            # coherence is judged by the unedited, unsteered model, as in every cell
            nlls = _unsteered_nll(lm, instructions, completions, batch_size, nll_measured(prompts, nll_prompts))
            neutral = coherence.neutral_nll(lm, completions, batch_size, nll_measured(prompts, nll_prompts))
            for j in [i, *sorted(j for j, first in copies.items() if first == i)]:
                plan, output, capability_out = cells[j]
                if capability_out is not None:
                    write_parquet(capability.to_table(spec.name, str(plan.source), plan.cell, plan.kind,
                                                      plan.edit.columns().get("coefficient"), metrics[i]),
                                  capability_out)
                write_parquet(generations_table(spec, plan, prompts, completions, ids, nlls, neutral), output)


def same_pick_as(cells: list[tuple[CellPlan, str, str | None]]) -> dict[int, int]:
    """Selection rules' picks that name the same candidate (Arditi's rule and COSMIC agreeing, or one rule under
    two KL caps): index -> the first such pick's index. The same ablation of the same direction on the same prompts
    gives the same tokens and measures, so it is generated once and written under each name."""
    first: dict[tuple, int] = {}
    copies = {}
    for i, (plan, *_) in enumerate(cells):
        if plan.source != Source.RULE:
            continue
        key = (plan.kind, plan.extraction_layer, plan.extraction_position, plan.labels, plan.capability,
               tuple(sorted(plan.edit.columns().items())))
        if key in first:
            copies[i] = first[key]
        else:
            first[key] = i
    return copies


def check_finite_logits(lm: LoadedModel, plan: CellPlan, iv: Edit, instructions: list[str],
                        batch_size: int, output: str) -> None:
    """The model gives finite next-token logits under the cell's intervention: greedy decoding of NaN
    logits picks token 0 at every step, an empty completion with a NaN loss, and would say nothing."""
    logits = last_logits(lm, instructions, iv, batch_size)
    bad = int((~torch.isfinite(logits)).any(-1).sum())
    if bad:
        how = plan.edit.overflow_hint(str(lm.hf.dtype).removeprefix("torch."))
        raise NonFiniteOutput(output, f"cell '{plan.cell}': next-token logits under {plan.kind} are NaN/inf on "
                                      f"{bad} of {len(instructions)} prompts{how}")


def plan_passes(plans: list[CellPlan], cells_per_pass: int) -> list[list[int]]:
    """Indices of `plans` grouped into generation passes: the baseline's pass first (the others read
    its answers), cells on the same prompt labels together, at most `cells_per_pass` a pass, and
    a weight edit alone (it is not per row)."""
    order = sorted(range(len(plans)), key=lambda i: plans[i].kind != "baseline")
    passes: list[list[int]] = []
    open_pass: dict[tuple[str, ...], list[int]] = {}
    for i in order:
        if plans[i].edit.edits_weights:
            passes.append([i])
            continue
        group = open_pass.get(plans[i].labels)
        if group is None or len(group) >= cells_per_pass:
            group = open_pass[plans[i].labels] = []
            passes.append(group)
        group.append(i)
    return passes


def check_direction_size(plan: CellPlan, prepared_dir: str, spec: ModelSpec, exp_file: str) -> None:
    direction = plan.edit.direction
    if direction is None:
        return
    hidden = hidden_size_of(prepared_dir)
    if hidden is not None and hidden != direction.shape[0]:
        raise ConfigError(exp_file, "pairs", f"direction from {plan.direction_model} has size "
                          f"{direction.shape[0]}, model {spec.name} has hidden size {hidden}")


def check_edit_layers(plan: CellPlan, prepared_dir: str, spec: ModelSpec, exp_file: str) -> None:
    """The blocks the edit touches exist in this model: a selected (or partner's) layer plus the
    intervention's offset can fall past the last block, which only the selection can show."""
    n = (model_metadata(spec, Path(prepared_dir)) or {}).get("n_layers")
    problem = plan.edit.layer_problem(n) if n else None
    if problem:
        raise ConfigError(exp_file, "interventions", f"cell {plan.cell}: {problem} in {spec.name} (the direction "
                          f"of {plan.direction_model} from layer {plan.extraction_layer}): change the "
                          "intervention's layer settings")


def nll_measured(prompts: pl.DataFrame, nll_prompts: int) -> list[bool]:
    """The nll costs a forward pass over prompt + completion: only the first `nll_prompts` of each
    label (the same prompts in every cell) get it."""
    rank = prompts.with_row_index("_i").select(pl.col("_i").rank("ordinal").over("label"))["_i"].to_list()
    return [r <= nll_prompts for r in rank]


def own_answers(baseline: pl.DataFrame | None, n: int) -> list[tuple[str, str]]:
    """The model's own unsteered answers to the first `n` harmless prompts (the baseline cell's)."""
    if baseline is None:
        raise ValueError("a steered cell's capability needs the baseline cell's completions")
    df = baseline.filter(pl.col("label") == "harmless").head(n)
    return list(zip(df["prompt"].to_list(), df["completion"].to_list()))


def baseline_answers(lm: LoadedModel, baseline: pl.DataFrame | None, cap: Capability,
                     batch_size: int) -> capability.BaselineAnswers | None:
    """The unsteered model's logits over its own answers' first positions (kl_tokens), once per job and on
    the unedited model; None until the baseline's answers exist (the baseline cell then runs first)."""
    if baseline is None:
        return None
    return capability.baseline_answers(lm, own_answers(baseline, cap.n), cap.kl_tokens, batch_size)


@contextlib.contextmanager
def edited_weights(lm: LoadedModel, plan: CellPlan, exp_file: str):
    """A weight edit (orthogonalisation) for the pass, undone after it: only the edited matrices are saved
    and restored. Activation edits change no weight."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(plan.edit.weights(lm.hf, lm.device))
        except ValueError as err:
            raise ConfigError(exp_file, "interventions", f"{plan.kind} of {lm.spec.name}: {err}") from None
        yield


def generations_table(spec: ModelSpec, plan: CellPlan, prompts: pl.DataFrame, completions: list[str],
                      ids: list[list[int]], nlls: list[float | None],
                      neutral: list[float | None] | None = None) -> pa.Table:
    n = len(completions)
    settings = {key: plan.edit.columns().get(key) for key in EDIT_COLUMNS}
    return pa.table({
        "model": [spec.name] * n, "template": [spec.template.name] * n, "source": [str(plan.source)] * n,
        "cell": [plan.cell] * n, "direction_model": [plan.direction_model] * n,
        "extraction_layer": [plan.extraction_layer] * n, "extraction_position": [plan.extraction_position] * n,
        "intervention": [plan.kind] * n,
        **{key: [value] * n for key, value in settings.items()},
        "prompt_id": prompts["prompt_id"].to_list(), "label": prompts["label"].to_list(),
        "category": prompts["category"].to_list(), "prompt": prompts["instruction"].to_list(),
        "completion": completions,
        "repetition": [coherence.repetition(r) for r in ids],
        "nll": nlls,
        "nll_neutral": neutral if neutral is not None else [None] * n,
    }, schema=GENERATIONS)


# The settings columns of the generations table, filled by each edit's `columns()`.
EDIT_COLUMNS = ("addition_layer", "coefficient", "normalized", "ablation_layers")


def _unsteered_nll(lm: LoadedModel, instructions: list[str], completions: list[str], batch_size: int,
                   measured: list[bool]) -> list[float | None]:
    """Per-token loss of the unsteered model on each measured completion (None where not measured)."""
    pairs = [(p, c) for p, c, m in zip(instructions, completions, measured) if m]
    sums = iter(completion_losses(lm, pairs, Edit(), batch_size))
    return [coherence.per_token(next(sums)) if m else None for m in measured]
