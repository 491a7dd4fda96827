"""Theorem 1: exact, vectorised certified top-k radii."""

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import beta, norm

from certify import certified_radius, radius_from_bounds
from certify.math.validation import UsageError

SIGMA, ALPHA = 0.25, 0.001


def theorem1_scalar(pl, others, k, sigma):
    """Brute-force Theorem 1 for one example: clip, sort, one brentq per t."""
    u = sorted(min(v, 1 - pl) for v in others)[::-1][:k][::-1]  # ascending k largest
    best = None
    for t in range(1, k + 1):
        p_t = min(sum(u[:t]), 1 - pl)
        if not pl > p_t / t:
            continue

        def gap(r, p_t=p_t, t=t):
            return (
                norm.logcdf(norm.ppf(pl) - r / sigma)
                - norm.logcdf(norm.ppf(p_t) + r / sigma)
                + np.log(t)
            )

        hi = sigma * (norm.ppf(pl) - norm.ppf(p_t / t)) + 1e-9
        r = brentq(gap, 0.0, hi, xtol=1e-15, rtol=1e-15, maxiter=500)
        best = r if best is None else max(best, r)
    return np.nan if best is None else best


def simuem(counts, label, alpha):
    n, c = counts.sum(), len(counts)
    level = alpha / c
    k_l = counts[label]
    pl = 0.0 if k_l == 0 else beta.ppf(level, k_l, n - k_l + 1)
    ups = [
        1.0 if v == n else beta.ppf(1 - level, v + 1, n - v)
        for i, v in enumerate(counts)
        if i != label
    ]
    return pl, ups


def test_k1_is_the_closed_form():
    rng = np.random.default_rng(1)
    counts = rng.multinomial(10_000, rng.dirichlet(np.ones(10) * 0.3), size=200)
    labels = counts.argmax(1)
    radii = certified_radius(counts, labels, 1, SIGMA, ALPHA).numpy()[:, 0]
    for row, label, r in zip(counts, labels, radii, strict=True):
        pl, ups = simuem(row, label, ALPHA)
        u = min(max(ups), 1 - pl)
        expected = SIGMA / 2 * (norm.ppf(pl) - norm.ppf(u)) if pl > u else np.nan
        np.testing.assert_allclose(r, expected, rtol=1e-9, atol=1e-12)


def test_matches_a_brute_force_solver_for_every_k():
    rng = np.random.default_rng(2)
    c = 8
    counts = rng.multinomial(5_000, rng.dirichlet(np.ones(c) * 0.5), size=60)
    labels = rng.integers(0, c, size=60)
    labels[:40] = np.argsort(-counts[:40], axis=1)[np.arange(40), rng.integers(0, 4, 40)]
    ks = (1, 2, 3, 5, 7)
    radii = certified_radius(counts, labels, ks, SIGMA, ALPHA).numpy()
    certified = 0
    for row, label, got in zip(counts, labels, radii, strict=True):
        pl, ups = simuem(row, label, ALPHA)
        expected = [theorem1_scalar(pl, ups, k, SIGMA) for k in ks]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
        certified += np.isfinite(expected).sum()
    assert certified > 150  # the comparison covered many certified (label, k) pairs


def test_reference_radii_of_the_authors(reference_counts, reference_radii_top3):
    """Our exact radii at k = 3 agree with the authors' file to its printed precision.

    The authors print 3 significant digits of the lower end of a binary search of width 1e-5,
    and 0.0 for an abstention (or a radius below 0.0005).
    """
    counts, labels = reference_counts
    ours = certified_radius(counts, labels, 3, SIGMA, ALPHA).numpy()[:, 0]
    theirs = reference_radii_top3
    abstain = np.isnan(ours)
    assert (theirs[abstain] == 0.0).all()
    positive = theirs > 0
    half_unit = 0.5 * 10.0 ** (np.floor(np.log10(theirs[positive])) - 2)
    np.testing.assert_array_less(np.abs(ours[positive] - theirs[positive]), half_unit + 1.1e-5)
    zero = ~abstain & ~positive
    assert (ours[zero] < 0.0005 + 1e-5).all()
    assert positive.sum() > 400 and abstain.sum() > 10  # both branches are exercised


def test_non_decreasing_in_k_and_alpha(reference_counts):
    counts, labels = reference_counts
    ks = (1, 2, 3, 4, 5, 9)
    previous = None
    for alpha in (1e-6, 1e-3, 1e-1):
        for bounds in ("simuem", "binocp"):
            r = np.nan_to_num(
                certified_radius(counts, labels, ks, SIGMA, alpha, bounds).numpy(), nan=-1
            )
            assert (np.diff(r, axis=1) >= -1e-12).all(), bounds
        r = np.nan_to_num(certified_radius(counts, labels, ks, SIGMA, alpha).numpy(), nan=-1)
        if previous is not None:
            assert (r >= previous - 1e-12).all()
        previous = r


def test_rows_are_independent():
    rng = np.random.default_rng(3)
    counts = rng.multinomial(1000, rng.dirichlet(np.ones(6)), size=40)
    labels = rng.integers(0, 6, size=40)
    together = certified_radius(counts, labels, (1, 2, 4), SIGMA, ALPHA).numpy()
    for i in (0, 17, 39):
        alone = certified_radius(counts[i : i + 1], labels[i : i + 1], (1, 2, 4), SIGMA, ALPHA)
        np.testing.assert_array_equal(alone.numpy()[0], together[i])


class TestEdgeCases:
    def test_all_samples_on_the_label(self):
        r = certified_radius([[0, 1000, 0, 0]], [1], (1, 2, 3), SIGMA, ALPHA).numpy()[0]
        assert np.isfinite(r).all() and (r > 0).all()
        # Cohen's bound for k = 1: every other upper bound clips to 1 - pl, so R = sigma * z(pl).
        pl = (ALPHA / 4) ** (1 / 1000)
        np.testing.assert_allclose(r[0], SIGMA * norm.ppf(pl), rtol=1e-10)

    def test_a_radius_beyond_float64_is_the_largest_float(self):
        """sigma = 1e308: the true radius (about 2.4e308) has no float64; the largest float is a
        true statement, infinity would not be."""
        with np.errstate(all="raise"):  # and no overflow warning
            r = certified_radius([[1000, 0, 0]], [0], 1, 1e308, 0.001).numpy()[0, 0]
        assert r == np.finfo(np.float64).max

    def test_no_sample_on_the_label_abstains(self):
        r = certified_radius([[0, 600, 400]], [0], (1, 2), SIGMA, ALPHA).numpy()
        assert np.isnan(r).all()

    def test_ties(self):
        # l tied with one other label: never certified for top-1, certified for top-2.
        r = certified_radius([[500, 500, 0, 0, 0]], [0], (1, 2), SIGMA, ALPHA).numpy()[0]
        assert np.isnan(r[0]) and r[1] > 0

    def test_two_classes(self):
        r = certified_radius([[900, 100], [100, 900]], [0, 0], 1, 1.0, ALPHA).numpy()[:, 0]
        pl = beta.ppf(ALPHA / 2, 900, 101)
        np.testing.assert_allclose(r[0], norm.ppf(pl), rtol=1e-10)  # u clipped to 1 - pl
        assert np.isnan(r[1])

    def test_one_sample(self):
        r = certified_radius([[1, 0, 0], [0, 1, 0]], [0, 0], (1, 2), SIGMA, 0.5).numpy()
        assert np.isnan(r).all()  # one sample cannot beat alpha = 0.5 / 3 per label

    def test_exact_probabilities_give_unbounded_radii(self):
        r = radius_from_bounds(
            [1.0, 0.7], [[1, 0, 0], [0.7, 0.3, 0.0]], [0, 0], (1, 2), 1.0
        ).numpy()
        assert np.isinf(r[0]).all() and np.isinf(r[1, 1])
        np.testing.assert_allclose(r[1, 0], (norm.ppf(0.7) - norm.ppf(0.3)) / 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": [[1.0, 2.0]]}, "integers"),
        ({"counts": [[1, -2]]}, ">= 0"),
        ({"counts": [[0, 0]]}, "sum to 0"),
        ({"labels": [2]}, "outside 0..1"),
        ({"labels": [0, 1]}, "shape"),
        ({"top_k": 0}, "k must satisfy"),
        ({"top_k": 2}, "k must satisfy"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"alpha": 1.0}, "alpha"),
        ({"bounds": "wilson"}, "bounds"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"counts": [[3, 1]], "labels": [0], "top_k": 1, "sigma": 0.5, "alpha": 0.1}
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        certified_radius(**args)
