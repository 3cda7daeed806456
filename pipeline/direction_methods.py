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

A method with settings declares them as a `Settings` schema (pipeline/yamlschema.py); the experiment's
`direction.method_settings` mapping is validated against it while the config loads (a bad key or value
is one ConfigError line naming `direction.method_settings.<key>`), and `compute` reads `self.settings`.
The report's label shows them ("winsorized difference of means (q=0.99)"), and the candidates Parquet
records them in its `method_settings` metadata (JSON), next to the `method` column's name.

Built in: `mean_diff` (the difference of means), `projected` (that difference with its component along
the harmless mean removed) and `winsorized` (the difference of means of rows clipped per prompt).
"""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, ClassVar, Mapping

import numpy as np
import pyarrow as pa
from pydantic import Field

from .errors import ConfigError
from .registry import Registry
from .yamlschema import Schema, validate

DIRECTION_METHODS: Registry = Registry("direction method")


class DirectionMethod:
    """One way to make a direction. Subclass it, set `label` (what the report calls the method) and define
    `compute`; `resampled` (bootstrap draws) repeats the drawn rows and calls `compute` per draw, which a
    method may replace by something faster that gives the same result."""

    name: str = ""  # the registered name, set when the method is looked up (`method`)
    label: str = ""
    # the method's settings (`direction.method_settings`), a Schema; None: the method takes none
    Settings: ClassVar[type[Schema] | None] = None
    settings: Schema | None = None  # the validated settings, set when the method is looked up

    def settings_text(self) -> str:
        """The settings as the report's label shows them after the method's words, "" for none."""
        if self.settings is None:
            return ""
        return ", ".join(f"{k}={v}" for k, v in self.settings.model_dump().items())

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


SETTINGS_KEY = "direction.method_settings"
SETTINGS_METADATA = b"method_settings"  # the candidates Parquet's metadata key for them (JSON)


def method(name: str, settings: Mapping[str, Any] | None = None, exp_file: str = "-",
           key: str = SETTINGS_KEY) -> DirectionMethod:
    """The registered method `name` with `settings` (`direction.method_settings`) validated against its
    `Settings`, ready to call; KeyError (listing the known names) if there is none, and one ConfigError
    (naming `exp_file` and `<key>.<setting>`) for a bad setting."""
    item = DIRECTION_METHODS.get(name)
    if isinstance(item, type) and issubclass(item, DirectionMethod):
        found = item()
    elif isinstance(item, DirectionMethod):
        found = copy.copy(item)  # the registered instance stays as it is
    elif callable(item):
        found = _FunctionMethod(item, name)
    else:
        raise TypeError(f"direction method {name!r} is a {type(item).__name__}, not a DirectionMethod or function")
    found.name = name
    settings = dict(settings or {})
    if found.Settings is not None:
        found.settings = validate(found.Settings, settings, exp_file, key + ".")
    elif settings:
        raise ConfigError(exp_file, f"{key}.{next(iter(settings))}",
                          f"direction method '{name}' takes no settings")
    text = found.settings_text()
    found.label = (found.label or name) + (f" ({text})" if text else "")
    return found


def settings_of(made: DirectionMethod) -> dict[str, Any]:
    """A method's settings as plain data (what the rules' params and the candidates' metadata hold)."""
    return made.settings.model_dump() if made.settings is not None else {}


def _draw_means(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each draw's mean of `rows` [rows, hidden], a draw being how often each row is drawn (`counts`
    [draws, rows]): the counts, normalised, times the rows, one product for all draws."""
    total = counts.sum(1, keepdims=True)
    if (total == 0).any():
        raise ValueError("a draw holds no row of one label")
    return (counts / total) @ rows


@DIRECTION_METHODS.register("mean_diff")
class MeanDiff(DirectionMethod):
    """mean(harmful) - mean(harmless), means taken apart in float64 (Arditi et al.), so identical activations
    give an exact zero."""

    label = "difference of means"

    def compute(self, harmful, harmless):
        return harmful.mean(0) - harmless.mean(0)

    def resampled(self, harmful, harmless, harmful_counts, harmless_counts):
        return _draw_means(harmful, harmful_counts) - _draw_means(harmless, harmless_counts)


def project_out_harmless(difference: np.ndarray, harmless_mean: np.ndarray) -> np.ndarray:
    """`difference` [..., hidden] less its component along `harmless_mean` [..., hidden] (row by row);
    a zero harmless mean leaves the difference as it is."""
    norm = np.linalg.norm(harmless_mean, axis=-1, keepdims=True)
    unit = np.divide(harmless_mean, norm, out=np.zeros_like(harmless_mean), where=norm > 0)
    return difference - (difference * unit).sum(-1, keepdims=True) * unit


@DIRECTION_METHODS.register("projected")
class Projected(DirectionMethod):
    """Projected abliteration (grimjim; heretic's `orthogonalize_direction`, llm-abliteration's `--projected`),
    the source-layer variant: with mu+ and mu- the harmful and harmless means of the rows the candidate is made
    from (its own layer and position), r = mu+ - mu- and u = mu- / |mu-|, the direction is r - (r . u) u, the
    difference of means with its component along the harmless mean removed. heretic normalises r and the
    result; here the projected raw r is returned, unnormalised, since a candidate keeps its raw scale (addition
    adds the raw norm). A zero harmless mean gives r unchanged."""

    label = "projected difference of means"

    def compute(self, harmful, harmless):
        harmless_mean = harmless.mean(0)
        return project_out_harmless(harmful.mean(0) - harmless_mean, harmless_mean)

    def resampled(self, harmful, harmless, harmful_counts, harmless_counts):
        harmless_means = _draw_means(harmless, harmless_counts)
        return project_out_harmless(_draw_means(harmful, harmful_counts) - harmless_means, harmless_means)


class WinsorizedSettings(Schema):
    # the quantile of each row's absolute components its components are clipped to (heretic's
    # winsorization_quantile, there off at 1.0)
    quantile: Annotated[float, Field(gt=0, lt=1)] = 0.99


def winsorize_rows(rows: np.ndarray, quantile: float) -> np.ndarray:
    """Each row [..., hidden] clipped to +-(the `quantile` of its own absolute components), numpy's default
    (linear) quantile interpolation, as torch.quantile's."""
    bound = np.quantile(np.abs(rows), quantile, axis=-1, keepdims=True)
    return np.clip(rows, -bound, bound)


@DIRECTION_METHODS.register("winsorized")
class Winsorized(DirectionMethod):
    """The difference of means of winsorized rows (heretic's `winsorization_quantile`), for models with massive
    activations (Gemma 3: one coordinate averaging ~4,400 against a median of 12), where a few coordinates
    would otherwise make the direction. As heretic does, each row (one prompt's activation at the layer and
    position) is clipped symmetrically, every component to +-(the `quantile` of that row's absolute component
    values), then mean(harmful) - mean(harmless) is taken. The issue asked for clipping "each dimension"
    (per coordinate, over prompts); heretic clips per prompt vector, and so does this method.

    Setting: `quantile` in (0, 1), default 0.99 (`direction.method_settings: {quantile: 0.99}`)."""

    label = "winsorized difference of means"
    Settings = WinsorizedSettings

    def settings_text(self):
        return f"q={self.settings.quantile:g}"

    def compute(self, harmful, harmless):
        q = self.settings.quantile
        return winsorize_rows(harmful, q).mean(0) - winsorize_rows(harmless, q).mean(0)

    def resampled(self, harmful, harmless, harmful_counts, harmless_counts):
        # a row's clipping is its own, whatever else is drawn: clip once, then average per draw
        q = self.settings.quantile
        return (_draw_means(winsorize_rows(harmful, q), harmful_counts)
                - _draw_means(winsorize_rows(harmless, q), harmless_counts))


def method_settings_of(table: pa.Table) -> dict[str, Any]:
    """The method settings a candidates table records (its `method_settings` metadata), {} if none."""
    raw = (table.schema.metadata or {}).get(SETTINGS_METADATA)
    return json.loads(raw) if raw else {}


def with_method_settings(table: pa.Table, settings: Mapping[str, Any]) -> pa.Table:
    """`table` recording `settings` in its metadata (`method_settings_of`); none recorded when empty."""
    if not settings:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          SETTINGS_METADATA: json.dumps(dict(settings), sort_keys=True).encode()})


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

    by_method: dict[tuple[str, str], list[str]] = {}
    for model, path in candidates.items():
        table = read_parquet(path)
        key = (method_of(table), json.dumps(method_settings_of(table), sort_keys=True))
        by_method.setdefault(key, []).append(model)
    labels = {key: method(key[0], json.loads(key[1])).label for key in by_method}
    if not by_method:
        return "method unknown"
    if len(by_method) == 1:
        return next(iter(labels.values()))
    return "; ".join(f"{labels[key]}: {', '.join(models)}" for key, models in by_method.items())
