"""Exact Clopper-Pearson, SimuEM and BinoCP bounds."""

import numpy as np
import pytest
from scipy.stats import beta

from certify import binocp_bounds, clopper_pearson_lower, clopper_pearson_upper, simuem_bounds
from certify.math.validation import UsageError


def test_clopper_pearson_matches_beta_quantiles():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200_000, size=300)
    k = rng.integers(1, n)  # strictly inside (0, n)
    for level in (1e-1, 1e-3, 1e-6):
        lower = clopper_pearson_lower(k, n, level)
        upper = clopper_pearson_upper(k, n, level)
        np.testing.assert_allclose(lower, beta.ppf(level, k, n - k + 1), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(upper, beta.ppf(1 - level, k + 1, n - k), rtol=1e-10)


def test_exact_ends():
    n = np.array([1, 10, 100_000, 10_000_000])
    assert (clopper_pearson_lower(np.zeros_like(n), n, 0.001) == 0.0).all()
    assert (clopper_pearson_upper(n, n, 0.001) == 1.0).all()
    # The other ends have closed forms: lower(n) = a^(1/n), upper(0) = 1 - a^(1/n).
    np.testing.assert_allclose(clopper_pearson_lower(n, n, 0.001), 0.001 ** (1 / n), rtol=1e-12)
    # upper(0) to full precision, also where 1 - a^(1/n) would cancel its digits away.
    n = np.append(n, 3_000_000_000)
    exact_upper = -np.expm1(np.log(0.001) / n)
    np.testing.assert_allclose(clopper_pearson_upper(0 * n, n, 0.001), exact_upper, rtol=1e-13)


def test_tiny_levels_are_refused_where_beta_quantiles_break_down():
    # At 1.3e-281 SciPy's inverse returns 0.4318 for a true quantile of 0.4130 (a lower bound
    # that misses 2.5e16 times too often, a radius 23 % too large): such levels are refused.
    with pytest.raises(UsageError, match="level must be at least 1e-100 .* got 1.3e-281"):
        clopper_pearson_lower(875, 910, 1.3e-281)
    with pytest.raises(UsageError, match="alpha must be at least 1e-100"):
        simuem_bounds([[875, 35, 0]], 1e-150)
    # At the smallest accepted level the bound still has Beta probability 1e-100 below it.
    bound = clopper_pearson_lower(875, 910, 1e-100)
    np.testing.assert_allclose(beta.cdf(bound, 875, 36), 1e-100, rtol=1e-9)


def test_bounds_bracket_the_estimate_and_widen_with_confidence():
    k, n = np.array([3, 50, 97]), np.array([100, 100, 100])
    for level in (0.1, 0.01):
        assert (clopper_pearson_lower(k, n, level) < k / n).all()
        assert (clopper_pearson_upper(k, n, level) > k / n).all()
    assert (clopper_pearson_lower(k, n, 0.01) < clopper_pearson_lower(k, n, 0.1)).all()
    assert (clopper_pearson_upper(k, n, 0.01) > clopper_pearson_upper(k, n, 0.1)).all()


def test_simuem_is_bonferroni_over_labels():
    counts = np.array([[70, 20, 10, 0], [0, 0, 5, 95]])
    lower, upper = simuem_bounds(counts, alpha=0.004)
    n = counts.sum(1, keepdims=True)
    np.testing.assert_array_equal(lower, clopper_pearson_lower(counts, n, 0.001))
    np.testing.assert_array_equal(upper, clopper_pearson_upper(counts, n, 0.001))


def test_binocp_uses_one_bound_at_alpha():
    counts = np.array([[70, 20, 10], [5, 5, 90]])
    p_lower, upper = binocp_bounds(counts, [0, 2], alpha=0.01)
    np.testing.assert_array_equal(p_lower, clopper_pearson_lower([70, 90], [100, 100], 0.01))
    np.testing.assert_array_equal(upper[0, 1:], 1 - p_lower[0])
    assert upper[0, 0] == 1.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: clopper_pearson_lower([1.5], [3], 0.1), "integers"),
        (lambda: clopper_pearson_lower([4], [3], 0.1), "0..n"),
        (lambda: clopper_pearson_upper([1], [3], 1.0), "level"),
        (lambda: simuem_bounds([[1, -1]], 0.1), ">= 0"),
        (lambda: simuem_bounds([[0, 0]], 0.1), "sum to 0"),
        (lambda: simuem_bounds([1, 2], 0.1), "shape"),
        (lambda: simuem_bounds([[1, 2]], 0.0), "alpha"),
        (lambda: binocp_bounds([[90, 5, 5]], [-1], 0.001), "label -1 of row 0 is outside 0..2"),
        (lambda: binocp_bounds([[90, 5, 5]], [0.9], 0.001), "labels must be integers"),
        (lambda: binocp_bounds([[90, 5, 5]], [0, 1], 0.001), r"labels must have shape \(1,\)"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(UsageError, match=match):
        call()
