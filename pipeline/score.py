"""Stage 5: score each completion as a refusal or not.

Scorers, named in YAML: `prefix` (the completion starts with a phrase, the
base-models post), `substring` (a phrase anywhere, the direction paper), and
`judge` (a local model decides; `judge.py`). An experiment may list several
(`scoring: [refusal-substring, judge-llama-guard-2]`): each cell's scores file then
holds one row per completion per scorer, told apart by the `scorer` column.
"""

from __future__ import annotations

import pyarrow as pa

from .refusal_phrases import is_refusal
from .schemas import SCORES, read_parquet, write_parquet
from .specs import ScorerSpec


def score_table(table: pa.Table, scorer: ScorerSpec, refused: list[bool] | None = None) -> pa.Table:
    """Append scorer and refused; `refused` comes precomputed from a judge, else from the phrases."""
    if refused is None:
        refused = [is_refusal(c, scorer) for c in table.column("completion").to_pylist()]
    if "nll_neutral" not in table.column_names:  # generations written before the column existed
        table = table.add_column(table.column_names.index("nll") + 1, "nll_neutral",
                                 pa.nulls(table.num_rows, pa.float64()))
    table = table.append_column("scorer", pa.array([scorer.name] * table.num_rows, pa.string()))
    return table.append_column("refused", pa.array(refused, pa.bool_())).cast(SCORES)


def run(scorers: ScorerSpec | list[ScorerSpec], generations_path: str, output: str,
        judge_dirs: dict[str, str] | None = None, device: str = "auto", threads: int = 2) -> None:
    """Score one cell; see `run_cells`."""
    run_cells(scorers, [(generations_path, output)], judge_dirs, device, threads)


def run_cells(scorers: ScorerSpec | list[ScorerSpec], cells: list[tuple[str, str]],
              judge_dirs: dict[str, str] | None = None, device: str = "auto", threads: int = 2) -> None:
    """Score cells' completions (per cell: generations file, scores file) with every scorer: one row per
    completion per scorer, the scorers' blocks in the order given. `judge_dirs`: each judge model's prepared
    folder, by model name; a judge model is loaded once for all the cells and the scorers that share it."""
    scorers = [scorers] if isinstance(scorers, ScorerSpec) else list(scorers)
    tables = [read_parquet(path) for path, _ in cells]
    decided: list[dict[str, list[bool]]] = [{} for _ in cells]
    for judge in dict.fromkeys(s.judge.name for s in scorers if s.kind == "judge"):
        # torch and the model code load in judge jobs only: phrase scoring starts in a fraction of the time
        from .judge import judge_refusals
        from .models import LoadedModel

        mine = [s for s in scorers if s.kind == "judge" and s.judge.name == judge]
        lm = LoadedModel(mine[0].judge, (judge_dirs or {})[judge], device, threads)
        for table, answers in zip(tables, decided):
            prompts, completions = table.column("prompt").to_pylist(), table.column("completion").to_pylist()
            for scorer in mine:
                answers[scorer.name] = judge_refusals(lm, scorer, prompts, completions)
        del lm
    for table, answers, (_, output) in zip(tables, decided, cells):
        write_parquet(pa.concat_tables([score_table(table, s, answers.get(s.name)) for s in scorers]), output)
