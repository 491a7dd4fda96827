"""Coverage by simulation: every probabilistic promise of the certification core holds.

Each check draws seeded Monte Carlo counts from distributions whose probabilities are known,
counts how often the procedure's promise is broken, and compares that frequency with the level
the procedure promises. The levels are large on purpose (0.1 or 0.2) so that an unsound
procedure would break them visibly in a few thousand trials.

Monte Carlo allowance (the same rule everywhere, see ``assert_rate_at_most``): an observed count
of failures ``f`` out of ``m`` trials is accepted when a procedure failing with probability
exactly ``level`` would produce ``f`` or more failures with probability at least 1e-6 (a
one-sided exact binomial test at significance 1e-6; for level 0.1 and 20,000 trials this allows
about 0.1 + 4.8 standard errors). Every check also shows teeth: a deliberately unsound variant
(Wald bound, no Bonferroni correction, plug-in probabilities, "the k most frequent labels") run
on the very same samples fails the same test.

Observed frequencies are printed (``python -m pytest tests/test_coverage.py -s``) and recorded in
``docs/reliability.md``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy.special import ndtri
from scipy.stats import binom
from torch import nn

from certify import (
    SmoothedClassifier,
    certified_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
    radius_from_bounds,
    simuem_bounds,
    top_k_set,
)

SIGNIFICANCE = 1e-6  # of the one-sided binomial test that decides "more often than allowed"


def exceeds(failures: int, trials: int, level: float) -> bool:
    """True when ``failures / trials`` is significantly above ``level``.

    One-sided exact binomial test: P(Binomial(trials, level) >= failures) < SIGNIFICANCE.
    """
    return failures > 0 and binom.sf(failures - 1, trials, level) < SIGNIFICANCE


def assert_rate_at_most(failures: int, trials: int, level: float, what: str) -> None:
    """The observed failure frequency is compatible with a true frequency <= ``level``."""
    assert not exceeds(int(failures), int(trials), level), (
        f"{what}: failed {failures}/{trials} = {failures / trials:.4f} times, allowed {level} "
        f"(P(Bin({trials}, {level}) >= {failures}) = {binom.sf(failures - 1, trials, level):.2g})"
    )


def report(what: str, failures: int, trials: int, level: float) -> None:
    print(f"[coverage] {what}: {failures}/{trials} = {failures / trials:.4f} (allowed {level})")


# ----------------------------------------------------------------------- Clopper-Pearson
P_GRID = (1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.999)
P_GRID = (*P_GRID, 1 - 1e-4, 1 - 1e-6)
N_GRID = (1, 2, 3, 5, 10, 30, 100, 300, 1_000, 10_000, 100_000)
CP_LEVEL, CP_TRIALS = 0.1, 20_000


def exact_miss_probabilities(p: float, n: int, level: float) -> tuple[float, float]:
    """P(lower(X) > p) and P(upper(X) < p) for X ~ Binomial(n, p), summed over the support.

    Outcomes more than 12 standard deviations (plus 20) from the mean are left out: their
    total probability is far below 1e-20.
    """
    sd = np.sqrt(n * p * (1 - p))
    x = np.arange(max(0, int(n * p - 12 * sd - 20)), min(n, int(n * p + 12 * sd + 20)) + 1)
    pmf = binom.pmf(x, n, p)
    miss_lower = pmf[clopper_pearson_lower(x, n, level) > p].sum()
    miss_upper = pmf[clopper_pearson_upper(x, n, level) < p].sum()
    return float(miss_lower), float(miss_upper)


def test_clopper_pearson_exact_miss_probability_is_at_most_the_level():
    """Exact (not simulated) miss probabilities on the whole (p, n) grid, two levels.

    For every p in 1e-6..1-1e-6 and n in 1..100,000, the probability that the one-sided lower
    bound lies above p (or the upper below p) is at most the level, and on the large-n cells it
    comes close to the level (the bound is not trivially loose, so the simulation below can see
    a miss rate near the level).
    """
    worst = 0.0
    for level in (CP_LEVEL, 1e-3):
        for p in P_GRID:
            for n in N_GRID:
                misses = exact_miss_probabilities(p, n, level)
                for side, miss in zip(("lower", "upper"), misses, strict=True):
                    assert miss <= level * (1 + 1e-9), (side, p, n, level, miss)
                    if level == CP_LEVEL:
                        worst = max(worst, miss)
    print(f"[coverage] Clopper-Pearson exact worst miss probability at level 0.1: {worst:.5f}")
    assert worst > 0.09


@pytest.mark.slow
def test_clopper_pearson_coverage_by_simulation():
    """Seeded simulation of the one-sided bounds on the (p, n) grid, 20,000 draws per cell.

    Proves: in no cell does the lower bound exceed p (or the upper fall below p) significantly
    more often than the level 0.1; the observed rates agree with the exact miss probabilities
    (so the simulation measures what it should). Teeth: the one-sided Wald bound
    p_hat -/+ z sqrt(p_hat (1 - p_hat) / n), evaluated on the same draws, fails the same test in
    many cells.
    """
    rng = np.random.default_rng(20200426)
    z = ndtri(1 - CP_LEVEL)
    worst = (0.0, None)
    wald_failures = cells = 0
    for p in P_GRID:
        for n in N_GRID:
            x = rng.binomial(n, p, size=CP_TRIALS)
            exact = exact_miss_probabilities(p, n, CP_LEVEL)
            misses = (
                int((clopper_pearson_lower(x, n, CP_LEVEL) > p).sum()),
                int((clopper_pearson_upper(x, n, CP_LEVEL) < p).sum()),
            )
            for side, miss, expected in zip(("lower", "upper"), misses, exact, strict=True):
                assert_rate_at_most(miss, CP_TRIALS, CP_LEVEL, f"CP {side} p={p} n={n}")
                # the simulation agrees with the exact miss probability (6 standard errors)
                se = np.sqrt(max(expected * (1 - expected), 1e-6) / CP_TRIALS)
                assert abs(miss / CP_TRIALS - expected) < 6 * se + 1e-4, (side, p, n)
                worst = max(worst, (miss / CP_TRIALS, f"{side} p={p} n={n}"), key=lambda w: w[0])
            p_hat = x / n
            half = z * np.sqrt(p_hat * (1 - p_hat) / n)
            wald = (int((p_hat - half > p).sum()), int((p_hat + half < p).sum()))
            wald_failures += sum(exceeds(m, CP_TRIALS, CP_LEVEL) for m in wald)
            cells += 2
    print(f"[coverage] Clopper-Pearson simulated worst miss rate: {worst[0]:.4f} ({worst[1]})")
    print(f"[coverage] Wald bound exceeds level 0.1 in {wald_failures}/{cells} (cell, side)")
    assert worst[0] > 0.085  # the simulation does see rates near the level
    assert wald_failures >= 20  # an unsound bound is caught


# ----------------------------------------------------------------------- SimuEM
def simuem_misses(counts: np.ndarray, p: np.ndarray, alpha: float):
    """Per trial and label: does SimuEM's lower bound exceed p, does its upper fall below p."""
    lower, upper = simuem_bounds(counts, alpha)
    return lower > p, upper < p


def joint_failures(miss_lower: np.ndarray, miss_upper: np.ndarray, use_lower: np.ndarray):
    """Trials in which some used bound fails; ``use_lower[j]`` picks label j's lower bound."""
    return (miss_lower[:, use_lower].any(axis=1) | miss_upper[:, ~use_lower].any(axis=1)).sum()


C10_CONFIGS = {
    "uniform": np.full(10, 0.1),
    "decreasing": np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01]),
    "dominant": np.array([0.91, *[0.01] * 9]),
}


@pytest.mark.slow
@pytest.mark.parametrize("n", [100, 10_000])
@pytest.mark.parametrize("config", sorted(C10_CONFIGS))
def test_simuem_joint_failure_c10(config, n):
    """SimuEM at c = 10, alpha = 0.1: the c one-sided bounds that a decision uses fail jointly
    at most alpha of the time, for EVERY one of the 2^10 ways of using one bound per label
    (CERTIFY of label l uses l's lower and the others' uppers; PREDICT of a top-k set uses the
    uppers inside it and the lowers outside it). Teeth: the same bounds without Bonferroni
    (each at level alpha) fail jointly far more often than alpha.

    Note: the guarantee covers c one-sided bounds, not all 2c at once; the observed rate of
    "some of the 2c bounds fails" is printed and is only promised to be <= 2 alpha.
    """
    alpha, trials = 0.1, 20_000
    p = C10_CONFIGS[config]
    rng = np.random.default_rng(n + len(config))
    counts = rng.multinomial(n, p, size=trials)
    miss_lower, miss_upper = simuem_misses(counts, p, alpha)
    # encode each trial's misses as 10-bit masks, then try every choice of bounds at once
    bits = 1 << np.arange(10)
    lower_mask, upper_mask = miss_lower @ bits, miss_upper @ bits  # (trials,)
    patterns = np.arange(1 << 10)  # bit j set: label j's lower bound is used
    failures = (((lower_mask[:, None] & patterns) | (upper_mask[:, None] & ~patterns)) != 0).sum(
        axis=0
    )  # (1024,)
    worst = int(failures.max())
    report(f"SimuEM c=10 {config} n={n} worst of 1024 patterns", worst, trials, alpha)
    assert_rate_at_most(worst, trials, alpha, f"SimuEM c=10 {config} n={n}")
    all_2c = int((miss_lower | miss_upper).any(axis=1).sum())
    report(f"SimuEM c=10 {config} n={n} all 2c bounds", all_2c, trials, 2 * alpha)
    assert_rate_at_most(all_2c, trials, 2 * alpha, "all 2c bounds")
    # teeth: no Bonferroni correction, the top label's lower and the others' uppers
    n_arr = np.full_like(counts, n)
    naive = joint_failures(
        clopper_pearson_lower(counts, n_arr, alpha) > p,
        clopper_pearson_upper(counts, n_arr, alpha) < p,
        np.arange(10) == 0,
    )
    report(f"SimuEM without Bonferroni c=10 {config} n={n}", int(naive), trials, alpha)
    if config != "dominant" or n > 100:  # 9 labels of p = 0.01 and n = 100 are too discrete
        assert exceeds(int(naive), trials, alpha)


@pytest.mark.slow
def test_simuem_joint_failure_c1000():
    """SimuEM at c = 1,000 (alpha = 0.1, n = 10,000, 1,000 trials, two distributions): the
    bounds used by CERTIFY of several labels and by PREDICT of several k fail jointly at most
    alpha of the time. Teeth: without Bonferroni they fail in almost every trial.
    """
    alpha, trials, c, n = 0.1, 1_000, 1_000, 10_000
    rng = np.random.default_rng(1000)
    dirichlet = np.sort(rng.dirichlet(np.ones(c)))[::-1]
    for name, p in (("uniform", np.full(c, 1 / c)), ("dirichlet", dirichlet)):
        counts = rng.multinomial(n, p, size=trials)
        miss_lower, miss_upper = simuem_misses(counts, p, alpha)
        worst = 0
        for label in (0, 1, 10, 500, 999):  # CERTIFY of `label`
            worst = max(worst, joint_failures(miss_lower, miss_upper, np.arange(c) == label))
        for k in (1, 5, 100):  # PREDICT of the top-k set (p sorted decreasingly)
            worst = max(worst, joint_failures(miss_lower, miss_upper, np.arange(c) >= k))
        report(f"SimuEM c=1000 {name} worst of 8 patterns", int(worst), trials, alpha)
        assert_rate_at_most(worst, trials, alpha, f"SimuEM c=1000 {name}")
        table = np.arange(n + 1)
        naive = joint_failures(
            clopper_pearson_lower(table, n, alpha)[counts] > p,
            clopper_pearson_upper(table, n, alpha)[counts] < p,
            np.arange(c) == 0,
        )
        report(f"SimuEM without Bonferroni c=1000 {name}", int(naive), trials, alpha)
        assert naive > 0.9 * trials


# ----------------------------------------------------------------------- end to end: CERTIFY
E2E_CONFIGS = {
    # (probabilities, labels to certify, n)
    "spread n=1000": (
        np.array([0.4, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.015, 0.005]),
        (0, 1, 2),
        1_000,
    ),
    "spread n=100000": (
        np.array([0.4, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.015, 0.005]),
        (0, 1, 3),
        100_000,
    ),
    # almost all the other mass on one label: BinoCP's "u = 1 - pl" is nearly exact for k = 1,
    # so its failure rate comes close to alpha (a sharp test)
    "two-label n=10000": (np.array([0.7, 0.2999, *[0.0001 / 8] * 8]), (0, 1), 10_000),
    # c = 2: both estimators reduce to one Clopper-Pearson bound (at alpha, or alpha / 2)
    "c=2 n=10000": (np.array([0.7, 0.3]), (0, 1), 10_000),
    "near-uniform n=10000": (np.array([0.15, *[0.85 / 9] * 9]), (0, 1), 10_000),
}


@pytest.mark.slow
@pytest.mark.parametrize("bounds", ["simuem", "binocp"])
@pytest.mark.parametrize("config", sorted(E2E_CONFIGS))
def test_certified_radius_exceeds_the_truth_at_most_alpha(config, bounds):
    """End to end, alpha = 0.1: for a multinomial with known p, the radius certified from
    sampled counts exceeds the Theorem 1 radius of the true p (or is certified where the
    truth is not) at most alpha of the time, for every k = 1..c-1, several labels and both
    estimators. Also for "some k fails" (all k share the same bounds).

    Teeth: the plug-in radius (Theorem 1 on the empirical frequencies) fails the same test.
    """
    p, labels, n = E2E_CONFIGS[config]
    c, alpha, sigma, trials = len(p), 0.1, 0.5, 2_000
    ks = tuple(range(1, c))
    rng = np.random.default_rng(zlib.crc32(config.encode()))
    counts = rng.multinomial(n, p, size=trials)
    plug_in_failures = 0
    for label in labels:
        truth = radius_from_bounds([p[label]], p[None, :], [label], ks, sigma).numpy()[0]
        rows = np.full(trials, label)
        got = certified_radius(counts, rows, ks, sigma, alpha, bounds).numpy()  # (trials, K)
        fail = ~np.isnan(got) & (np.isnan(truth) | (got > truth + 1e-9))
        per_k = fail.sum(axis=0)
        for k, f in zip(ks, per_k, strict=True):
            assert_rate_at_most(f, trials, alpha, f"{config} {bounds} label {label} k={k}")
        any_k = int(fail.any(axis=1).sum())
        assert_rate_at_most(any_k, trials, alpha, f"{config} {bounds} label {label} any k")
        worst_k = ks[per_k.argmax()]
        report(
            f"CERTIFY {bounds} {config} label {label} k={worst_k}", int(per_k.max()), trials, alpha
        )
        report(f"CERTIFY {bounds} {config} label {label} any k", any_k, trials, alpha)
        freq = counts / n
        plug = radius_from_bounds(freq[:, label], freq, rows, ks, sigma).numpy()
        plug_fail = ~np.isnan(plug) & (np.isnan(truth) | (plug > truth + 1e-9))
        plug_in_failures = max(plug_in_failures, int(plug_fail.sum(axis=0).max()))
    report(f"CERTIFY plug-in {config} worst (label, k)", plug_in_failures, trials, alpha)
    assert exceeds(plug_in_failures, trials, alpha)


# ----------------------------------------------------------------------- PREDICT
def strictly_correct(sets: np.ndarray, p: np.ndarray) -> np.ndarray:
    """A returned set S is correct iff min_{i in S} p_i > max_{j not in S} p_j (strict: with a
    tie at the k-th place no set is correct, and every answer counts as wrong)."""
    inside = np.zeros((sets.shape[0], len(p)), dtype=bool)
    np.put_along_axis(inside, sets, True, axis=1)
    low_in = np.where(inside, p, np.inf).min(axis=1)
    high_out = np.where(inside, -np.inf, p).max(axis=1)
    return low_in > high_out


def near_tie(c: int, k: int, gap: float) -> np.ndarray:
    """Probabilities, decreasing, whose k-th and (k+1)-th are ``m * (1 +/- gap)`` (0: a tie),
    the other labels of the top-k at 1.5 m .. 2 m and the rest at 0.1 m .. 0.5 m."""
    p = np.concatenate(
        [np.linspace(2, 1.5, k - 1), [1 + gap, 1 - gap], np.linspace(0.5, 0.1, c - k - 1)]
    )
    return p / p.sum()


@pytest.mark.slow
@pytest.mark.parametrize(("c", "k"), [(2, 1), (10, 1), (10, 4), (10, 9), (100, 10)])
def test_top_k_set_wrong_at_most_alpha(c, k):
    """PREDICT (``top_k_set``) on multinomial counts, alpha = 0.2: over near ties and exact ties
    at the k-th place, a returned set that is not the strict top-k happens at most alpha of the
    time, per gap (n = 20,000, 2,000 trials per gap). At c = 2 with an exact tie the rate is
    close to alpha (a sharp check).
    Teeth: "the k most frequent labels" is wrong far more often.

    (tests/test_sampler.py covers c = 6, k = 1..3; this extends to c = 2, k = c - 1, c = 100 and
    exact ties, where any answer is wrong.)
    """
    alpha, n, trials = 0.2, 20_000, 2_000
    rng = np.random.default_rng(100 * c + k)
    naive_wrong = 0
    for gap in (0.0, 0.05, 0.2, 0.6):
        p = near_tie(c, k, gap)
        counts = rng.multinomial(n, p, size=trials)
        sets = top_k_set(torch.from_numpy(counts), k, alpha).numpy()
        said = sets[:, 0] >= 0
        wrong = int((~strictly_correct(sets[said], p)).sum())
        assert_rate_at_most(wrong, trials, alpha, f"top_k_set c={c} k={k} gap={gap}")
        report(f"PREDICT top_k_set c={c} k={k} gap={gap}", wrong, trials, alpha)
        print(f"[coverage]   answered {int(said.sum())}/{trials}")
        naive = np.argsort(-counts, axis=1, kind="stable")[:, :k]
        naive_wrong = max(naive_wrong, int((~strictly_correct(naive, p)).sum()))
    assert said.mean() > 0.5  # at the widest gap it answers: the rule is not "always abstain"
    assert exceeds(naive_wrong, trials, alpha)


class Slabs(nn.Module):
    """Label i where ``edges[i-1] < w.z <= edges[i]`` (``|w| = 1``): a base classifier whose
    smoothed probabilities at x are Phi((edges[i] - w.x) / sigma) - Phi((edges[i-1] - w.x) /
    sigma)."""

    def __init__(self, w: torch.Tensor, edges: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.register_buffer("edges", edges)

    def forward(self, z):
        label = torch.bucketize(z.flatten(1).to(self.w.dtype) @ self.w, self.edges)
        return nn.functional.one_hot(label, len(self.edges) + 1).float()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("p", "k"),
    [
        ((0.5, 0.5), 1),  # an exact tie: every answer is wrong, a sound rule answers <= alpha
        ((0.45, 0.35, 0.15, 0.05), 2),  # a clear top-2: the rule answers, and answers right
    ],
)
def test_smoothed_classifier_predict_wrong_at_most_alpha(p, k):
    """End to end through ``SmoothedClassifier.predict`` with the ``Slabs`` classifier, whose
    smoothed probabilities p at x are known in closed form; alpha = 0.2, n = 1000, 300
    independent noise streams. Proves: the empirical frequencies match the closed form (the
    classifier is the one we reason about) and the returned set is wrong at most alpha of the
    time. At the exact tie (c = 2) the wrong-answer rate of a sound rule is close to alpha (it
    answers only when one Clopper-Pearson bound at alpha / 2 fails), so this is a sharp check;
    "the most frequent label" (teeth) is wrong every time.
    """
    p = np.array(p)
    alpha, n, trials, sigma = 0.2, 1_000, 300, 0.25
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x = torch.full((trials, 3), 0.5)  # a mid-grey input, repeated with independent noise
    offset = float(x[0].double() @ (w / w.norm()))
    edges = torch.tensor(offset + sigma * ndtri(np.cumsum(p)[:-1]), dtype=torch.float64)
    smoothed = SmoothedClassifier(Slabs(w, edges), num_classes=len(p), sigma=sigma)
    ids = list(range(trials))
    counts = smoothed.sample_counts(x, n=n, seed=7, example_ids=ids, batch_size=10_000).numpy()
    freq = counts.sum(axis=0) / (n * trials)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / (n * trials)))
    sets = smoothed.predict(x, k, n, alpha, batch_size=10_000, seed=7, example_ids=ids).numpy()
    said = sets[:, 0] >= 0
    wrong = int((~strictly_correct(sets[said], p)).sum())
    report(f"PREDICT SmoothedClassifier p={p.tolist()} k={k}", wrong, trials, alpha)
    print(f"[coverage] SmoothedClassifier.predict answered {int(said.sum())}/{trials}")
    assert_rate_at_most(wrong, trials, alpha, "SmoothedClassifier.predict")
    naive = np.argsort(-counts, axis=1, kind="stable")[:, :k]
    naive_wrong = int((~strictly_correct(naive, p)).sum())
    if p[k - 1] == p[k]:
        assert naive_wrong == trials  # teeth: an unsound rule answers, hence errs, always
    else:
        assert said.mean() > 0.9 and wrong == 0
