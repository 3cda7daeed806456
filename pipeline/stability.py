"""Selection stability: how much the direction and the selection's pick depend on the train prompts drawn.

Each bootstrap draw resamples every label's train prompts with replacement (as many as the
label has; seeded per draw, so draw d is the same whatever the number of draws) and
recomputes every candidate per layer x position from the cached activations, by the
experiment's direction method (pipeline/direction_methods.py; `mean_diff` takes each draw's
means as weighted means with each prompt's draw count as its weight, in float64). The
full-data direction is the method on every prompt once, as the directions stage makes it.
No forward pass is needed, which keeps this cheap enough for the default run. With the
experiment's direction filter on, the draws resample the prompts that survive the filter, as
the full-data direction does.

Reported per draw, layer and position: the cosine with the full-data direction at the same
layer and position. With `reselect`, selection itself reruns on each draw's candidates
(the same val prompts, scores and filters as the `select` stage: its forward passes, once
per draw), and the report says how often it picks the full data's (layer, position).
Directions forced in YAML are not reselected.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
from tqdm import tqdm

from .candidates import candidates_table, filter_by_refusal
from .config import Bootstrap, Selection
from .direction_methods import method as direction_method
from .errors import ConfigError
from .figures import pyplot, to_png
from .schemas import STABILITY, column_matrix, read_parquet, write_bytes, write_parquet, write_text


class Stack:
    """Activations as an array [layer, position, prompt, hidden] with the prompts' labels."""

    def __init__(self, table: pa.Table):
        acts = column_matrix(table, "act")
        layer_col = table.column("layer").to_numpy()
        pos_col = table.column("position").to_numpy()
        ids = table.column("prompt_id").to_pylist()
        labels = table.column("label").to_pylist()
        self.layers = sorted({int(x) for x in layer_col})
        self.positions = sorted({int(x) for x in pos_col})
        self.prompt_ids = list(dict.fromkeys(ids))  # first-seen order
        label_of = dict(zip(ids, labels))
        self.labels = np.array([label_of[p] for p in self.prompt_ids])
        li = np.searchsorted(self.layers, layer_col)
        pi = np.searchsorted(self.positions, pos_col)
        index = {p: i for i, p in enumerate(self.prompt_ids)}
        ni = np.array([index[p] for p in ids])
        self.values = np.full((len(self.layers), len(self.positions), len(self.prompt_ids), acts.shape[1]),
                              np.nan, dtype=acts.dtype)
        self.values[li, pi, ni] = acts
        if np.isnan(self.values).any():
            raise ValueError("activations table: not every prompt has every layer x position")

    def full(self, method: str, settings: dict | None = None) -> np.ndarray:
        """The full data's directions by `method` (every prompt once, as the directions stage takes them),
        [layer, position, hidden], float64."""
        make, harm = direction_method(method, settings), self.labels == "harmful"
        out = np.empty((len(self.layers), len(self.positions), self.values.shape[-1]))
        for li in range(len(self.layers)):
            for pi in range(len(self.positions)):
                rows = self.values[li, pi]
                out[li, pi] = make.direction(rows[harm], rows[~harm])
        return out

    def directions(self, counts: np.ndarray, method: str, settings: dict | None = None) -> np.ndarray:
        """Each row of `counts` [draws, prompts] (how often each prompt is drawn) as directions by `method`,
        [draws, layer, position, hidden], float64."""
        make, harm = direction_method(method, settings), self.labels == "harmful"
        out = np.empty((counts.shape[0], len(self.layers), len(self.positions), self.values.shape[-1]))
        for li in range(len(self.layers)):  # one layer x position at a time: the float64 copies stay small
            for pi in range(len(self.positions)):
                rows = self.values[li, pi]
                out[:, li, pi] = make.directions(rows[harm], rows[~harm], counts[:, harm], counts[:, ~harm])
        return out

    def mean_norm(self) -> np.ndarray:
        """Norm of the harmful prompts' mean activation, [layer, position]: the scale a direction is zero
        next to (`cosines`)."""
        harm = self.labels == "harmful"
        return np.stack([np.linalg.norm(self.values[li][:, harm].astype(np.float64).mean(1), axis=-1)
                         for li in range(len(self.layers))])  # one layer at a time: the float64 copy stays small


def draw_counts(labels: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[draws, prompts]: how often each prompt is drawn when each label's prompts are resampled with
    replacement. Draw d uses the generator seeded with (seed, d), so it does not depend on `draws`."""
    counts = np.zeros((draws, len(labels)), dtype=np.int64)
    for d in range(draws):
        rng = np.random.default_rng([seed, d + 1])
        for label in ("harmful", "harmless"):
            members = np.flatnonzero(labels == label)
            picked = rng.choice(members, size=len(members), replace=True)
            counts[d] += np.bincount(picked, minlength=len(labels))
    return counts


# A direction this small next to the activations it is the difference of is rounding, not a direction.
ZERO_RELATIVE = 1e-9


def cosines(draws: np.ndarray, full: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Cosine of each draw's direction with the full-data one, [draws, layer, position]; NaN where the
    full-data direction is zero relative to `scale` [layer, position] (the norm of the activations'
    mean), as at the embedding layer, whose post-instruction tokens are the same for every prompt."""
    dot = np.einsum("dlph,lph->dlp", draws, full)
    norms = np.linalg.norm(draws, axis=-1) * np.linalg.norm(full, axis=-1)[None]
    defined = (np.linalg.norm(full, axis=-1) > ZERO_RELATIVE * scale)[None] & (norms > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, dot / np.where(defined, norms, 1.0), np.nan)


def cosine_table(model: str, stack: Stack, counts: np.ndarray, selected: tuple[int, int],
                 method: str, settings: dict | None = None) -> pl.DataFrame:
    """One row per draw x layer x position: norm of the draw's direction (by `method`) and its cosine with the
    full data's."""
    per_draw = stack.directions(counts, method, settings)
    cos = cosines(per_draw, stack.full(method, settings), stack.mean_norm())
    norms = np.linalg.norm(per_draw, axis=-1)
    harm = stack.labels == "harmful"
    rows = []
    for d in range(counts.shape[0]):
        drawn = counts[d] > 0
        n_h, n_s = int((drawn & harm).sum()), int((drawn & ~harm).sum())
        for li, layer in enumerate(stack.layers):
            for pi, pos in enumerate(stack.positions):
                rows.append({"model": model, "draw": d + 1, "layer": layer, "position": pos, "n_harmful": n_h,
                             "n_harmless": n_s, "norm": float(norms[d, li, pi]), "cosine": float(cos[d, li, pi]),
                             "selected": (layer, pos) == selected})
    return pl.DataFrame(rows)


def draw_candidates(model: str, stack: Stack, counts_row: np.ndarray, method: str,
                    settings: dict | None = None) -> pa.Table:
    """One draw's candidates in the candidates.parquet layout, for the selection code."""
    vecs = stack.directions(counts_row[None], method, settings)[0]
    harm = stack.labels == "harmful"
    n_h, n_s = int(counts_row[harm].sum()), int(counts_row[~harm].sum())
    diffs = {(layer, pos): (vecs[li, pi], n_h, n_s)
             for li, layer in enumerate(stack.layers) for pi, pos in enumerate(stack.positions)}
    return candidates_table(model, diffs, method, settings)


def reselect(lm, stack: Stack, counts: np.ndarray, harmful: list[str], harmless: list[str],
             rules: Selection, method: str, settings: dict | None = None, rule: str = "auto") -> pl.DataFrame:
    """Selection rerun on each draw's candidates (by `method`): bypass, induce, kl, discarded and picked per
    draw x candidate. A draw where no candidate survives picks nothing. The selection's own scoring and choice
    (pipeline/selection.py), not a copy, so reselection cannot drift from it; `rule`: direction.select's."""
    from .selection import choose, score_candidates  # torch and the model code: only when reselecting

    frames = []
    for d in tqdm(range(counts.shape[0]), desc=f"reselect {lm.spec.name}", leave=False):
        scores = score_candidates(lm, draw_candidates(lm.spec.name, stack, counts[d], method, settings), harmful,
                                  harmless, rules, rule)
        try:
            pick = choose(scores, lm.spec.name, lm.spec.file, rule)
        except ConfigError:
            pick = None
        frames.append(scores.select("layer", "position", "bypass", "induce", "kl", "discarded").with_columns(
            draw=pl.lit(d + 1, pl.Int64), picked=(pl.col("layer") == (pick or (-1, 0))[0])
            & (pl.col("position") == (pick or (-1, 0))[1])))
    return pl.concat(frames)


def stability_table(cos: pl.DataFrame, reselected: pl.DataFrame | None) -> pa.Table:
    keys = ["draw", "layer", "position"]
    if reselected is None:
        df = cos.with_columns(bypass=pl.lit(None, pl.Float64), induce=pl.lit(None, pl.Float64),
                              kl=pl.lit(None, pl.Float64), discarded=pl.lit(None, pl.String),
                              picked=pl.lit(None, pl.Boolean))
    else:
        df = cos.join(reselected.with_columns(pl.col("layer", "position").cast(pl.Int64)),
                      on=keys, how="left")
    return df.select(STABILITY.names).to_arrow().cast(STABILITY)


def summary(table: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per model x layer at the selected position: mean, min and max cosine over draws;
    per model x draw: the pick, when selection was rerun)."""
    sel = table.filter(pl.col("selected")).select("model", "position").unique()
    at = table.join(sel, on=["model", "position"])
    per_layer = at.group_by("model", "layer", "position", maintain_order=True).agg(
        mean=pl.col("cosine").mean(), min=pl.col("cosine").min(), max=pl.col("cosine").max(),
        selected=pl.col("selected").any()).sort("model", "layer")
    picks = table.filter(pl.col("picked").is_not_null()).group_by("model", "draw", maintain_order=True).agg(
        layer=pl.col("layer").filter(pl.col("picked")).first(),
        position=pl.col("position").filter(pl.col("picked")).first()).sort("model", "draw")
    return per_layer, picks


def chart(table: pl.DataFrame) -> bytes:
    """Per model: cosine with the full-data direction vs layer at the selected position (mean over draws,
    min..max band), and, when selection was rerun, how often each (layer, position) was picked."""
    plt = pyplot()
    per_layer, picks = summary(table)
    models = table["model"].unique(maintain_order=True).to_list()
    cols = 2 if picks.height else 1
    fig, axes = plt.subplots(len(models), cols, figsize=(6 * cols, 3.4 * len(models)), squeeze=False)
    draws = table["draw"].n_unique()
    for i, model in enumerate(models):
        m = per_layer.filter(pl.col("model") == model).filter(pl.col("mean").is_not_nan())
        ax = axes[i][0]
        layers = m["layer"].to_list()
        ax.fill_between(layers, m["min"].to_numpy(), m["max"].to_numpy(), alpha=0.25, label="min..max over draws")
        ax.plot(layers, m["mean"].to_numpy(), marker="o", label="mean")
        chosen = m.filter(pl.col("selected"))
        if chosen.height:
            ax.plot(chosen["layer"].to_list(), chosen["mean"].to_list(), marker="*", color="red", markersize=14,
                    linestyle="none", label="selected")
        position = m["position"][0] if m.height else "?"
        ax.set_title(f"{model}: {draws} bootstrap draws of the train prompts, position {position}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine with full-data direction")
        ax.legend(fontsize=7)
        if cols == 2:
            ax = axes[i][1]
            mp = picks.filter(pl.col("model") == model)
            if mp.height:
                names = [f"{r['layer']},{r['position']}" if r["layer"] is not None else "none"
                         for r in mp.iter_rows(named=True)]
                labels, counts = np.unique(names, return_counts=True)
                full = chosen_label(table, model)
                ax.bar(labels, counts, color=["tab:red" if lab == full else "tab:gray" for lab in labels])
                ax.set_title(f"pick per draw (red: the full data's, {full})", fontsize=9)
                ax.set_xlabel("layer,position")
                ax.set_ylabel("draws")
            else:
                ax.axis("off")
                ax.text(0.5, 0.5, "direction forced: not reselected", ha="center", va="center")
    fig.tight_layout()
    return to_png(fig)


def chosen_label(table: pl.DataFrame, model: str) -> str:
    sel = table.filter((pl.col("model") == model) & pl.col("selected")).select("layer", "position").unique()
    return f"{sel['layer'][0]},{sel['position'][0]}" if sel.height else "?"


def markdown(table: pl.DataFrame, chart_path: str, bootstrap: Bootstrap, forced: dict[str, bool], label: str) -> str:
    """`label`: the direction method's (`DirectionMethod.label`)."""
    per_layer, picks = summary(table)
    draws = table["draw"].n_unique()
    lines = ["## Selection stability", "",
             f"{draws} bootstrap draws (seed {bootstrap.seed}) resample each label's train prompts with "
             f"replacement; every candidate direction ({label}) is recomputed from the cached activations. "
             "Cosine of each "
             "draw's direction with the full-data direction at the same layer, at the selected position "
             "(mean and min over draws; **bold**: the selected layer).", "",
             f"![selection stability]({chart_path})", ""]
    for model in table["model"].unique(maintain_order=True).to_list():
        m = per_layer.filter(pl.col("model") == model)
        full = chosen_label(table, model)
        lines += [f"### {model}: selected (layer, position) = ({full})", ""]
        if forced.get(model):
            lines += ["The direction is forced in YAML, so selection was not rerun.", ""]
        elif not bootstrap.reselect:
            lines += ["Selection was not rerun per draw (`direction.bootstrap.reselect: false`).", ""]
        else:
            mp = picks.filter(pl.col("model") == model)
            same = sum(1 for r in mp.iter_rows(named=True) if f"{r['layer']},{r['position']}" == full)
            others = [f"({r['layer']},{r['position']})" if r["layer"] is not None else "none survived"
                      for r in mp.iter_rows(named=True)]
            lines += [f"Selection rerun on each draw picked the full data's ({full}) in **{same}/{mp.height}** "
                      f"draws; picks by draw: {', '.join(others)}.", ""]
        lines += ["| layer | mean cosine | min cosine |", "|---|---|---|"]
        for r in m.iter_rows(named=True):
            if r["mean"] is None or math.isnan(r["mean"]):
                continue  # zero full-data direction: no cosine
            layer = f"**{r['layer']}**" if r["selected"] else str(r["layer"])
            lines.append(f"| {layer} | {r['mean']:.4f} | {r['min']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def model_stability(model: str, activations_path: str, selected_path: str, bootstrap: Bootstrap,
                    filter_prompts: bool, exp_file: str, method: str, settings: dict | None = None
                    ) -> tuple[Stack, np.ndarray, pl.DataFrame]:
    """The activations stack, the draws' counts and the cosine table (directions by `method`) of one model."""
    table = read_parquet(activations_path)
    if filter_prompts:
        table = filter_by_refusal(table, exp_file, model)
    stack = Stack(table)
    sel = pl.from_arrow(read_parquet(selected_path)).filter(pl.col("source") == "self")
    selected = (int(sel["layer"][0]), int(sel["position"][0]))
    counts = draw_counts(stack.labels, bootstrap.draws, bootstrap.seed)
    return stack, counts, cosine_table(model, stack, counts, selected, method, settings)


def run(models: dict, activations: dict[str, str], selected: dict[str, str], bootstrap: Bootstrap,
        table_out: str, chart_out: str, md_out: str, *, method: str, filter_prompts: bool, rules: Selection,
        prompts_path: str | None, device: str, threads: int, exp_file: str, settings: dict | None = None,
        rule: str = "auto") -> None:
    """`models`: name -> (spec, prepared dir, forced); spec and dir are needed (and the model loaded) only
    to reselect, which happens with `bootstrap.reselect` for directions not forced. `method`: the experiment's
    direction method, as the directions stage used it, with its `settings`; `rule`: the selection rule
    (direction.select) reselection applies."""
    frames = []
    for name, (spec, prepared, forced) in models.items():
        stack, counts, cos = model_stability(name, activations[name], selected[name], bootstrap,
                                             filter_prompts, exp_file, method, settings)
        reselected = None
        if bootstrap.reselect and not forced:
            from .models import LoadedModel
            from .probes import val_prompts
            from .selection import filter_by_score

            lm = LoadedModel(spec, prepared, device, threads)
            harmful, harmless = val_prompts(prompts_path)
            if filter_prompts:
                harmful, harmless = filter_by_score(lm, harmful, harmless, rules.batch_size)
            reselected = reselect(lm, stack, counts, harmful, harmless, rules, method, settings, rule)
        frames.append(stability_table(cos, reselected))
    table = pa.concat_tables(frames)
    write_parquet(table, table_out)
    df = pl.from_arrow(table)
    write_bytes(chart(df), chart_out)
    # the fragment sits in results/<experiment>/, the chart in results/<experiment>/stability/
    write_text(markdown(df, "stability/" + chart_out.rsplit("/", 1)[-1], bootstrap,
                        {name: forced for name, (_, _, forced) in models.items()},
                        direction_method(method, settings).label),
               md_out)
