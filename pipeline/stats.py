"""The statistics the summary and report attach to their numbers.

- `wilson_interval`: the Wilson score interval of a binomial proportion (a refusal rate);
  unlike the normal approximation it stays inside [0, 1] and is not empty at 0/n or n/n.
- `mcnemar_exact`: the paired exact McNemar test, two-sided: under the null the discordant
  pairs split as Binomial(b + c, 1/2); computed exactly with integer binomial coefficients.
- `correlation_interval`: Pearson or Spearman correlation with a Fisher-z 95% interval.
- `bootstrap_cosine_se`: the bootstrap (over prompts) standard error of the cosine between
  two models' directions (by the experiment's direction method), for `normal_interval`.

Only the standard library and numpy (and the direction methods): no scipy in the environment,
and none needed.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
MIN_CORRELATION_POINTS = 8  # below this a correlation's 95% interval spans most of [-1, 1]


def z_quantile(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard normal quantile: 1.959963984540054 for 95%."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for successes/n; (nan, nan) when there are no trials."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    z2 = z_quantile(confidence) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2 * p * (1 - p) / n + z2 * z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0/n and n/n one bound is exactly 0 or 1 in exact arithmetic; clamp the rounding error
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def binomial_tail(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integers until the final division)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    b: pairs refused only without the intervention, c: only with it. Two-sided by
    doubling the smaller tail (the binomial is symmetric at 1/2), capped at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0  # no discordant pair: no evidence either way
    return min(1.0, 2 * binomial_tail(min(b, c), n))


def paired_mcnemar(before: dict[str, bool], after: dict[str, bool]) -> float | None:
    """McNemar p-value of two outcomes on the same prompts (prompt id -> refused).

    None when the prompt sets differ: the test needs every prompt measured both ways.
    """
    if not before or set(before) != set(after):
        return None
    b = sum(1 for k, v in before.items() if v and not after[k])
    c = sum(1 for k, v in before.items() if not v and after[k])
    return mcnemar_exact(b, c)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (what Spearman's rho needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        ranked[tied] = ranked[tied].mean()
    return ranked


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either variable is constant (r is undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0:
        return None
    return max(-1.0, min(1.0, float(dx @ dy) / denominator))


def fisher_interval(r: float, n: int, confidence: float = CONFIDENCE, variance_factor: float = 1.0
                    ) -> tuple[float, float]:
    """Interval for a correlation from Fisher's z = atanh(r), standard error sqrt(factor / (n - 3))."""
    if n <= 3:
        return math.nan, math.nan
    if abs(r) >= 1:
        return r, r  # atanh is infinite: the interval collapses (and says little)
    half = z_quantile(confidence) * math.sqrt(variance_factor / (n - 3))
    z = math.atanh(r)
    return math.tanh(z - half), math.tanh(z + half)


# Fieller, Hartley & Pearson (1957): var(atanh(rho_s)) is about 1.06 / (n - 3).
SPEARMAN_VARIANCE_FACTOR = 1.06


def correlation_interval(x, y, method: str = "pearson", confidence: float = CONFIDENCE
                         ) -> tuple[float, float, float] | None:
    """(r, low, high), or None when r is undefined (a constant variable, or fewer than 4 points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if len(x) < 4:
        return None
    if method == "spearman":
        x, y, factor = ranks(x), ranks(y), SPEARMAN_VARIANCE_FACTOR
    elif method == "pearson":
        factor = 1.0
    else:
        raise ValueError(f"unknown correlation method {method!r}")
    r = pearson(x, y)
    if r is None:
        return None
    return (r, *fisher_interval(r, len(x), confidence, factor))


def cosine_rows(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [..., d] arrays (nan where a row is zero)."""
    norms = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, (u * v).sum(-1) / norms, np.nan)


def bootstrap_cosine_se(a: dict[str, np.ndarray], b: dict[str, np.ndarray], resamples: int = 1000,
                        seed: int = 0, method: str = "mean_diff", settings: dict | None = None) -> np.ndarray:
    """Bootstrap standard error of cos(direction of a, direction of b), per layer, the directions made by
    `method` with `settings` (pipeline/direction_methods.py: the experiment's `direction.method` and
    `direction.method_settings`).

    `a`, `b`: label ("harmful", "harmless") -> activations [prompts, layers, d], the two models'
    rows in the same prompt order. Each resample draws the prompts of each label with
    replacement, the same draw for both models (they saw the same prompts), and recomputes
    both directions. A standard error rather than percentiles: resampling adds noise to the
    means, which pulls a cosine near +-1 toward 0, so the percentile interval of a
    near-parallel pair can miss the estimate itself; estimate +- z * se cannot.
    """
    from .direction_methods import method as direction_method

    make = direction_method(method, settings)
    rng = np.random.default_rng(seed)
    draws = {label: rng.integers(0, len(a[label]), size=(resamples, len(a[label])))
             for label in ("harmful", "harmless")}
    counts = {label: np.stack([np.bincount(row, minlength=len(a[label])) for row in idx])
              for label, idx in draws.items()}  # [resamples, prompts]: how often each prompt is drawn
    layers = a["harmful"].shape[1]
    cosines = np.empty((resamples, layers))
    for layer in range(layers):  # one layer at a time: a method sees one layer's rows, and memory stays small
        u, v = (make.directions(acts["harmful"][:, layer], acts["harmless"][:, layer], counts["harmful"],
                                counts["harmless"]) for acts in (a, b))
        cosines[:, layer] = cosine_rows(u, v)
    return np.nanstd(cosines, axis=0, ddof=1)


def normal_interval(estimate: np.ndarray, se: np.ndarray, bounds: tuple[float, float] = (-1.0, 1.0),
                    confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """estimate +- z * se, clipped to the quantity's range (a cosine lives in [-1, 1])."""
    half = z_quantile(confidence) * np.asarray(se)
    return np.clip(estimate - half, *bounds), np.clip(estimate + half, *bounds)
