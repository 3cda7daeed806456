"""pipeline/stats.py against hand computations and published values."""

import math

import numpy as np
import pytest

from pipeline import stats

Z = 1.959963984540054  # the 97.5% standard normal quantile
Z2 = Z * Z


def test_normal_quantile():
    assert stats.z_quantile() == pytest.approx(Z, abs=1e-12)
    assert stats.z_quantile(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)


def test_wilson_at_the_edges_and_the_middle_of_32_trials():
    # 0/n: [0, z²/(n + z²)];  n/n: [n/(n + z²), 1]
    assert stats.wilson_interval(0, 32) == (0.0, pytest.approx(Z2 / (32 + Z2), abs=1e-12))
    assert stats.wilson_interval(0, 32)[1] == pytest.approx(0.107179, abs=1e-6)
    assert stats.wilson_interval(32, 32) == (pytest.approx(32 / (32 + Z2), abs=1e-12), 1.0)
    assert stats.wilson_interval(32, 32)[0] == pytest.approx(0.892821, abs=1e-6)
    # 16/32: centred on 0.5, half-width z·sqrt(1/(4n) + z²/(4n²)) / (1 + z²/n)
    half = Z * math.sqrt(1 / 128 + Z2 / 4096) / (1 + Z2 / 32)
    assert half == pytest.approx(0.163691, abs=1e-6)
    low, high = stats.wilson_interval(16, 32)
    assert (low, high) == (pytest.approx(0.5 - half, abs=1e-12), pytest.approx(0.5 + half, abs=1e-12))


@pytest.mark.parametrize("k,n,low,high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score, no continuity correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0000, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_published_values(k, n, low, high):
    got = stats.wilson_interval(k, n)
    assert (round(got[0], 4), round(got[1], 4)) == (low, high)


@pytest.mark.parametrize("k,n", [(0, 1), (3, 10), (7, 32), (50, 100)])
def test_wilson_is_symmetric_and_contains_the_rate(k, n):
    low, high = stats.wilson_interval(k, n)
    mirror_low, mirror_high = stats.wilson_interval(n - k, n)
    assert low == pytest.approx(1 - mirror_high, abs=1e-12) and high == pytest.approx(1 - mirror_low, abs=1e-12)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_without_trials_or_with_impossible_counts():
    assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


@pytest.mark.parametrize("b,c,p", [
    (0, 6, 0.03125),          # 2 · 1/2⁶
    (6, 0, 0.03125),          # symmetric
    (1, 9, 0.021484375),      # 2 · (1 + 10)/2¹⁰
    (2, 8, 0.109375),         # 2 · (1 + 10 + 45)/2¹⁰
    (0, 5, 0.0625),           # 2/2⁵: five one-sided flips are not significant at 5%
    (3, 3, 1.0),              # balanced: the doubled tail exceeds 1, capped
    (4, 5, 1.0),
    (0, 0, 1.0),              # no discordant pair
    (0, 1, 1.0),
])
def test_mcnemar_exact(b, c, p):
    assert stats.mcnemar_exact(b, c) == p


def test_mcnemar_large_counts_stay_exact():
    # 2 · P(X <= 10), X ~ Bin(60, 1/2), summed as integers
    expected = 2 * sum(math.comb(60, i) for i in range(11)) / 2 ** 60
    assert stats.mcnemar_exact(10, 50) == expected == stats.mcnemar_exact(50, 10)
    with pytest.raises(ValueError):
        stats.mcnemar_exact(-1, 2)


def test_paired_mcnemar_counts_discordant_prompts_only():
    before = {"a": True, "b": True, "c": False, "d": False, "e": False, "f": False, "g": False, "h": False}
    after = {"a": True, "b": False, "c": True, "d": True, "e": True, "f": True, "g": True, "h": True}
    # b = 1 (prompt b: refused only before), c = 6 (c..h: only after); a agrees
    assert stats.paired_mcnemar(before, after) == stats.mcnemar_exact(1, 6) == 2 * 8 / 128
    assert stats.paired_mcnemar(after, before) == stats.paired_mcnemar(before, after)
    assert stats.paired_mcnemar(before, {**after, "z": True}) is None  # other prompts: no pairing
    assert stats.paired_mcnemar({}, {}) is None


def test_ranks_average_ties():
    assert stats.ranks(np.array([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_fisher_interval_by_hand():
    # r = 0.5, n = 19: z = atanh(0.5) = 0.549306, se = 1/4
    low, high = stats.fisher_interval(0.5, 19)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - Z / 4), abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.0592, 0.7776)
    assert all(math.isnan(v) for v in stats.fisher_interval(0.5, 3))


def test_correlation_interval_pearson_and_spearman():
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [2, 1, 4, 3, 6, 5, 8, 7]
    # Pearson by hand: both have sum of squared deviations 42; the cross-products are
    # 4 · 8.75 + 4 · 0.75 = 38
    r, low, high = stats.correlation_interval(x, y)
    assert r == pytest.approx(38 / 42, abs=1e-12)
    assert (low, high) == stats.fisher_interval(38 / 42, 8)
    assert low < r < high
    # ranks equal the values here, so Spearman's rho is the same r, with a wider interval (1.06 / (n - 3))
    rho, s_low, s_high = stats.correlation_interval(x, y, method="spearman")
    assert rho == pytest.approx(38 / 42, abs=1e-12) and s_low < low and s_high > high
    # Spearman only sees order: a monotone transform of y leaves it at 1
    assert stats.correlation_interval(x, [v ** 3 for v in x], method="spearman")[0] == pytest.approx(1.0)
    assert stats.correlation_interval(x, [1.0] * 8) is None  # constant: undefined
    assert stats.correlation_interval(x[:3], y[:3]) is None


def _model(rng, direction, n, noise=0.5):
    layers, d = direction.shape
    return {"harmful": direction + noise * rng.standard_normal((n, layers, d)),
            "harmless": noise * rng.standard_normal((n, layers, d))}


def test_bootstrap_se_equals_a_plain_loop_over_the_same_draws():
    rng = np.random.default_rng(1)
    true = rng.standard_normal((3, 16))
    a, b = _model(rng, true, 8), _model(rng, -true, 8)
    se = stats.bootstrap_cosine_se(a, b, resamples=200, seed=5)
    draws = np.random.default_rng(5)  # the function draws harmful, then harmless indices, [resamples, prompts]
    harmful, harmless = draws.integers(0, 8, (200, 8)), draws.integers(0, 8, (200, 8))
    cosines = []
    for i, j in zip(harmful, harmless):
        u = a["harmful"][i].mean(0) - a["harmless"][j].mean(0)
        v = b["harmful"][i].mean(0) - b["harmless"][j].mean(0)
        cosines.append((u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1))
    np.testing.assert_allclose(se, np.std(cosines, axis=0, ddof=1), atol=1e-12)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(1)
    true = rng.standard_normal((3, 16))
    # model b: the same direction at layer 0, reversed at layer 1, unrelated at layer 2
    other = np.stack([true[0], -true[1], rng.standard_normal(16)])
    truth = stats.cosine_rows(true, other)
    widths = []
    for n in (8, 128):
        a, b = _model(rng, true, n), _model(rng, other, n)
        estimate = stats.cosine_rows(a["harmful"].mean(0) - a["harmless"].mean(0),
                                     b["harmful"].mean(0) - b["harmless"].mean(0))
        low, high = stats.normal_interval(estimate, stats.bootstrap_cosine_se(a, b, resamples=400, seed=0))
        assert (low <= estimate).all() and (estimate <= high).all() and (low >= -1).all() and (high <= 1).all()
        widths.append(high - low)
    # with 128 prompts the interval covers the true cosines (with 8, noise in the means pulls the
    # estimate of a parallel pair toward 0 by more than its spread: a bias no interval of this kind fixes)
    assert ((low <= truth + 1e-9) & (truth - 1e-9 <= high)).all()
    assert (widths[1] < widths[0] / 2).all()  # 16x the prompts: about a quarter of the width
    assert np.array_equal(stats.bootstrap_cosine_se(a, b, 50, seed=3), stats.bootstrap_cosine_se(a, b, 50, seed=3))


def test_normal_interval_by_hand():
    low, high = stats.normal_interval(np.array([0.5, 0.95]), np.array([0.1, 0.1]))
    assert low.tolist() == pytest.approx([0.5 - Z * 0.1, 0.95 - Z * 0.1]) and high.tolist() == pytest.approx(
        [0.5 + Z * 0.1, 1.0])
