"""Validity of sequential certification by simulation (``certify.math.sequential``).

Inputs with known class probabilities, ``draw`` from a multinomial: the rate at which a
reported radius exceeds the Theorem 1 radius of the exact probabilities (or is reported where
the truth certifies nothing) stays at or under alpha, within 3 binomial standard errors, at
alpha 0.01 and 0.05, per k and for "some k" (every k and every target of an input rest on
the same bounds). The configurations put the label just below a target radius (where a
procedure that looks too often reports that target), at a near tie, and among 100 classes,
with k from 1 to 5 (4,000 trials at c = 2, 2,000 at c = 10, 1,000 at c = 100), for the union
bound over the looks and for the mixture confidence sequence. Teeth: at c = 2, the same
procedure without correction across looks (every look at the full alpha) fails the same test,
and so does a mixture whose prior is fitted to the samples it is tested on.

Observed rates are printed (``python -m pytest tests/test_sequential_coverage.py -s``) and
recorded in ``docs/sequential.md``.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from certify import radius_from_bounds
from certify.math.mixture import mixture_bounds
from certify.math.sequential import DEFAULT_FUTILITY, _certify_rounds, look_schedule, spend

SIGMA = 0.5
TARGETS = (0.0, 0.25, 0.5, 0.75)
N_MAX, FIRST = 20_000, 100  # 25 looks: many chances for an uncorrected procedure to err


def true_radius(p: np.ndarray, label: int, ks) -> np.ndarray:
    """Theorem 1 radius of the exact probabilities, ``(len(ks),)`` (NaN: not certified)."""
    return radius_from_bounds([p[label]], p[None, :], [label], ks, SIGMA).numpy()[0]


def just_below(q: np.ndarray, label: int, k: int, target: float) -> np.ndarray:
    """``q`` mixed with the point mass on ``label`` so that the true top-k radius is 0.1 %
    below ``target``."""

    def gap(t: float) -> float:
        p = (1 - t) * q
        p[label] += t
        r = true_radius(p, label, (k,))[0]
        return (-1.0 if np.isnan(r) else r) - target * 0.999

    t = brentq(gap, 0.0, 1 - 1e-12, xtol=1e-15)
    p = (1 - t) * q
    p[label] += t
    return p


def decreasing(c: int) -> np.ndarray:
    p = 1.0 / np.arange(1, c + 1)
    return p / p.sum()


CONFIGS = {
    # (probabilities, label, k values)
    "c=2, just below r=0.5": (just_below(np.array([0.5, 0.5]), 0, 1, 0.5), 0, (1,)),
    "c=10, top-3 just below r=0.5": (just_below(decreasing(10), 2, 3, 0.5), 2, (1, 2, 3, 4, 5)),
    "c=10, near tie of 4 labels": (np.array([0.19] * 4 + [0.04] * 6), 2, (1, 2, 3, 4, 5)),
    "c=100, top-5 just below r=0.25": (just_below(decreasing(100), 4, 5, 0.25), 4, (1, 3, 5)),
}


def simulate(
    p, label, ks, alpha, trials, seed, unsound=False, futility=DEFAULT_FUTILITY, budget=None,
    mixture=False,
):  # fmt: skip
    """Failures per k ``(K,)`` and for some k, and the mean samples, over ``trials`` inputs.
    ``mixture``: the first look's bounds at 5 % of alpha, the mixture sequence at 45 % on the
    samples after it, the last look's at 50 % (the mixture method of the benchmark)."""
    looks = look_schedule(N_MAX, FIRST)
    levels = np.full(len(looks), alpha) if unsound else spend(alpha, len(looks))
    if mixture:
        levels = np.zeros(len(looks))
        levels[0], levels[-1] = 0.05 * alpha, 0.5 * alpha
    rng = np.random.default_rng(seed)

    def draw(m, active):
        return torch.from_numpy(rng.multinomial(m, p, size=trials) * active.numpy()[:, None])

    labels = np.full(trials, label)
    cert = _certify_rounds(
        draw, labels, ks, SIGMA, TARGETS, looks, levels, futility, budget, 0.45 * alpha * mixture
    )
    got, truth = cert.radius.numpy(), true_radius(p, label, ks)  # (trials, K), (K,)
    fail = ~np.isnan(got) & (np.isnan(truth) | (got > truth + 1e-9))
    return fail.sum(axis=0), int(fail.any(axis=1).sum()), float(cert.samples.float().mean())


def allowed(alpha: float, trials: int) -> float:
    """alpha plus 3 binomial standard errors."""
    return alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


@pytest.mark.slow
@pytest.mark.parametrize("mixture", [False, True], ids=["union", "mixture"])
@pytest.mark.parametrize("alpha", [0.01, 0.05])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reported_radius_exceeds_the_truth_at_most_alpha(config, alpha, mixture):
    p, label, ks = CONFIGS[config]
    trials = {2: 4_000, 10: 2_000, 100: 1_000}[len(p)]
    seed = zlib.crc32(f"{config} {alpha} {'mixture' * mixture}".encode())
    per_k, any_k, mean = simulate(p, label, ks, alpha, trials, seed, mixture=mixture)
    limit = allowed(alpha, trials)
    print(
        f"[sequential] {config} alpha={alpha} mixture={mixture}: some k failed {any_k}/{trials} = "
        f"{any_k / trials:.4f} (allowed {limit:.4f}); worst k {ks[int(per_k.argmax())]}; "
        f"mean samples {mean:.0f}"
    )
    for k, failures in zip(ks, per_k, strict=True):
        assert failures / trials <= limit, (config, alpha, k, failures)
    assert any_k / trials <= limit, (config, alpha, any_k)
    if config.startswith("c=2") and not mixture:  # teeth where one bound decides and errors
        # add up visibly: every look at the full alpha, on fresh draws of the same inputs
        _, unsound, _ = simulate(p, label, ks, alpha, trials, seed + 1, unsound=True)
        print(f"[sequential]   without correction across looks: {unsound}/{trials}")
        assert unsound / trials > limit, (config, alpha, unsound)


@pytest.mark.slow
@pytest.mark.parametrize(("futility", "budget"), [(None, None), (0.5, None), (0.02, 2_000)])
def test_the_stopping_rule_does_not_matter_for_validity(futility, budget):
    """Pursuing every target to n_max, giving up on point estimates, or giving up what the
    optimistic bounds do not certify within a tenth of n_max keeps the rate."""
    p, label, ks = CONFIGS["c=2, just below r=0.5"]
    alpha, trials = 0.05, 4_000
    _, any_k, _ = simulate(p, label, ks, alpha, trials, 17, futility=futility, budget=budget)
    print(f"[sequential] futility={futility} budget={budget}: {any_k / trials:.4f}")
    assert any_k / trials <= allowed(alpha, trials)


@pytest.mark.slow
@pytest.mark.parametrize("level", [0.01, 0.05])
def test_the_mixture_sequence_misses_at_most_its_level_at_any_look(level):
    """A Bernoulli(0.3) stream looked at every 50 draws up to 10,000, its prior the first 500
    draws': the sequence misses p at some look at most ``level`` of the time. Teeth: a prior
    fitted to the same draws it is tested on (so it no longer is a martingale) misses more."""
    p, first, trials = 0.3, 500, 4_000
    rng = np.random.default_rng(int(level * 1000))
    draws = rng.random((trials, 10_000)) < p  # (trials, 10000)
    prior = draws[:, :first].sum(axis=1) + 0.5, first - draws[:, :first].sum(axis=1) + 0.5
    ones = np.cumsum(draws[:, first:], axis=1)[:, 49::50]  # (trials, looks)
    m = np.arange(50, 10_000 - first + 1, 50)  # (looks,)

    def misses(a, b):
        lower, upper = mixture_bounds(ones, m, a, b, level)
        return ((lower > p) | (upper < p)).any(axis=1).mean()

    sound = misses(prior[0][:, None], prior[1][:, None])
    fitted = misses(ones + 0.5, m - ones + 0.5)
    print(f"[sequential] mixture at {level}: misses {sound:.4f}; prior fitted {fitted:.4f}")
    assert sound <= allowed(level, trials) < fitted


def test_the_configurations_are_what_they_say():
    """The thresholds are where the names put them (the truth 0.1 % below the target)."""
    for name, (p, _, _) in CONFIGS.items():
        assert np.isclose(p.sum(), 1.0) and (p >= 0).all(), name
    for name, k, target in (
        ("c=2, just below r=0.5", 1, 0.5),
        ("c=10, top-3 just below r=0.5", 3, 0.5),
        ("c=100, top-5 just below r=0.25", 5, 0.25),
    ):
        p, label, _ = CONFIGS[name]
        assert np.isclose(true_radius(p, label, (k,))[0], 0.999 * target, rtol=1e-9), name
    p, label, ks = CONFIGS["c=10, near tie of 4 labels"]
    truth = true_radius(p, label, ks)
    assert np.isnan(truth[:3]).all() and (truth[3:] > 0).all()  # tied in the top 4
