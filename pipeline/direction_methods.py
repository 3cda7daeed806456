"""Direction methods: how one candidate direction is made from a layer x position's train activations.

A method turns the harmful rows [n, hidden] and the harmless rows [m, hidden] of one layer and
post-instruction position into one direction [hidden], in float64. Every place that makes a
direction calls the experiment's method (`direction.method`) through this registry: the
directions stage (candidates), the stability bootstrap (each draw's directions) and the
bootstrap of the base/chat cosine (pipeline/stats.py). A method of your own is a plugin (the
experiment's `plugins:` list, pipeline/registry.py) that registers a subclass or a function:

    from pipeline.direction_methods import DIRECTION_METHODS, DirectionMethod

    @DIRECTION_METHODS.register("median_diff")
    class MedianDiff(DirectionMethod):
        label = "difference of medians"

        def compute(self, harmful, harmless):
            return np.median(harmful, 0) - np.median(harmless, 0)

A plain function `compute(harmful, harmless)` may be registered too; its `label` attribute, if
any, is the report's label, else the registered name. `compute` gets float64 arrays.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .registry import Registry

DIRECTION_METHODS: Registry = Registry("direction method")


class DirectionMethod:
    """One way to make a direction. Subclass it, set `label` (what the report calls the method) and define
    `compute`; `resampled` (bootstrap draws) repeats the drawn rows and calls `compute` per draw, which a
    method may replace by something faster that gives the same result."""

    name: str = ""  # the registered name, set when the method is looked up (`method`)
    label: str = ""

    def compute(self, harmful: np.ndarray, harmless: np.ndarray) -> np.ndarray:
        """harmful [n, hidden], harmless [m, hidden], float64 -> direction [hidden]."""
        raise NotImplementedError

    def resampled(self, harmful: np.ndarray, harmless: np.ndarray, harmful_counts: np.ndarray,
                  harmless_counts: np.ndarray) -> np.ndarray:
        """The direction of each bootstrap draw, [draws, hidden]. `*_counts` [draws, rows]: how often each row
        is drawn."""
        return np.stack([self.compute(np.repeat(harmful, ch, axis=0), np.repeat(harmless, cs, axis=0))
                         for ch, cs in zip(harmful_counts, harmless_counts)])

    def direction(self, harmful: np.ndarray, harmless: np.ndarray) -> np.ndarray:
        """`compute` on the rows as float64, its result checked: one float64 vector of the rows' width."""
        return self._checked(self.compute(np.asarray(harmful, dtype=np.float64),
                                          np.asarray(harmless, dtype=np.float64)), (harmful.shape[-1],))

    def directions(self, harmful: np.ndarray, harmless: np.ndarray, harmful_counts: np.ndarray,
                   harmless_counts: np.ndarray) -> np.ndarray:
        """`resampled` on float64 rows, its result checked: [draws, hidden]."""
        out = self.resampled(np.asarray(harmful, dtype=np.float64), np.asarray(harmless, dtype=np.float64),
                             np.asarray(harmful_counts), np.asarray(harmless_counts))
        return self._checked(out, (len(harmful_counts), harmful.shape[-1]))

    def _checked(self, out, shape: tuple[int, ...]) -> np.ndarray:
        out = np.asarray(out)
        if out.shape != shape:
            raise ValueError(f"direction method {self.name!r} returned shape {out.shape}, expected {shape}")
        return out.astype(np.float64, copy=False)


class _FunctionMethod(DirectionMethod):
    """A registered plain function `compute(harmful, harmless)`."""

    def __init__(self, function, name: str):
        self.function = function
        self.label = getattr(function, "label", None) or name

    def compute(self, harmful, harmless):
        return self.function(harmful, harmless)


def method(name: str) -> DirectionMethod:
    """The registered method `name`, ready to call; KeyError (listing the known names) if there is none."""
    item = DIRECTION_METHODS.get(name)
    if isinstance(item, type) and issubclass(item, DirectionMethod):
        found = item()
    elif isinstance(item, DirectionMethod):
        found = item
    elif callable(item):
        found = _FunctionMethod(item, name)
    else:
        raise TypeError(f"direction method {name!r} is a {type(item).__name__}, not a DirectionMethod or function")
    found.name = name
    found.label = found.label or name
    return found


@DIRECTION_METHODS.register("mean_diff")
class MeanDiff(DirectionMethod):
    """mean(harmful) - mean(harmless), means taken apart in float64 (Arditi et al.), so identical activations
    give an exact zero."""

    label = "difference of means"

    def compute(self, harmful, harmless):
        return harmful.mean(0) - harmless.mean(0)

    def resampled(self, harmful, harmless, harmful_counts, harmless_counts):
        # a draw's mean is its counts, normalised, times the rows: one product for all draws
        means = []
        for rows, counts in ((harmful, harmful_counts), (harmless, harmless_counts)):
            total = counts.sum(1, keepdims=True)
            if (total == 0).any():
                raise ValueError("a draw holds no row of one label")
            means.append((counts / total) @ rows)
        return means[0] - means[1]


def method_of(table: pa.Table) -> str:
    """The method named in a candidates or selected table's `method` column (one per table)."""
    if "method" not in table.column_names:
        raise ValueError("the directions table has no method column; rerun its directions job")
    names = {m for m in table.column("method").to_pylist() if m is not None}
    if len(names) != 1:
        raise ValueError(f"the directions table names {len(names)} methods ({sorted(names)}), expected one")
    return names.pop()


def methods_label(candidates: dict[str, str]) -> str:
    """The report's words for the methods that made these candidates Parquets (model -> path): one label, or
    each differing one with its models."""
    from .schemas import read_parquet

    by_method: dict[str, list[str]] = {}
    for model, path in candidates.items():
        by_method.setdefault(method_of(read_parquet(path)), []).append(model)
    if not by_method:
        return "method unknown"
    if len(by_method) == 1:
        return method(next(iter(by_method))).label
    return "; ".join(f"{method(name).label}: {', '.join(models)}" for name, models in by_method.items())
