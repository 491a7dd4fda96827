"""Numerical care at the extremes (see docs/reliability.md, "Numerical extremes").

References are computed independently with mpmath at 50 significant digits: Phi^-1 through
erfinv, Theorem 1 roots by bracketing root finding, and Clopper-Pearson bounds near 0 and 1 by
solving the binomial tail equation written as a finite sum. Extremes covered: probabilities
within 1e-12 (and one ulp) of 1, n = 10^7, sigma = 1e-3 and 10, c = 2 and c = 10,000, and the
precision of the Gaussian noise when the model runs in bfloat16.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from scipy.stats import kstest
from torch import nn

from certify import (
    SmoothedClassifier,
    certified_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
    radius_from_bounds,
    top_k_set,
)

mp.mp.dps = 50


# ---------------------------------------------------------------------------- references
def mp_ppf(p) -> mp.mpf:
    """Phi^-1 at 50 digits; ``p`` is taken exactly (a float64 converts without rounding)."""
    return mp.sqrt(2) * mp.erfinv(2 * mp.mpf(p) - 1)


def mp_radius_t(pl, big_p, t: int, sigma: float):
    """Root R of log Phi(z_l - R/sigma) = log Phi(z_P + R/sigma) - log t; None if not certified."""
    pl, big_p = mp.mpf(pl), mp.mpf(big_p)
    if not pl > big_p / t:
        return None
    z_l, z_p = mp_ppf(pl), mp_ppf(big_p)

    def gap(x):
        return mp.log(mp.ncdf(z_l - x)) - mp.log(mp.ncdf(z_p + x)) + mp.log(t)

    hi = z_l - mp_ppf(mp.ncdf(z_p) / t)
    return sigma * mp.findroot(gap, (mp.mpf(0), hi), solver="anderson", tol=mp.mpf(10) ** -40)


def mp_theorem1(pl, uppers, k: int, sigma: float) -> float:
    """Theorem 1 in mpmath: clip, take the k largest, max over t. NaN if not certified."""
    pl = mp.mpf(pl)
    u = sorted(min(mp.mpf(v), 1 - pl) for v in uppers)[::-1][:k][::-1]  # ascending
    best = None
    for t in range(1, k + 1):
        r = mp_radius_t(pl, min(mp.fsum(u[:t]), 1 - pl), t, sigma)
        if r is not None and (best is None or r > best):
            best = r
    return float("nan") if best is None else float(best)


def mp_binomial_tail(n: int, j: int, q) -> mp.mpf:
    """P(Binomial(n, q) <= j) as a finite sum (exact for any n, cheap for small j)."""
    q = mp.mpf(q)
    return mp.fsum(mp.binomial(n, i) * q**i * (1 - q) ** (n - i) for i in range(j + 1))


def mp_cp_upper(j: int, n: int, level: float) -> mp.mpf:
    """Clopper-Pearson upper bound for j successes: the U with P(Bin(n, U) <= j) = level."""
    guess = -mp.log(mp.mpf(level)) / n * (j + 1) + mp.mpf(j) / n  # generous bracket
    hi = min(mp.mpf(1), 4 * guess + mp.mpf(10) / n)
    return mp.findroot(
        lambda u: mp.log(mp_binomial_tail(n, j, u)) - mp.log(level),
        (mp.mpf(0) + mp.mpf(10) ** -30, hi),
        solver="anderson",
        tol=mp.mpf(10) ** -40,
    )


def mp_cp_lower_near_one(x: int, n: int, level: float) -> mp.mpf:
    """Clopper-Pearson lower bound for x = n - j successes (j small): 1 - upper(j) by symmetry."""
    return 1 - mp_cp_upper(n - x, n, level)


# ---------------------------------------------------------------------------- p near 1
EXTREME_BOUNDS = [
    # (p_lower, upper bounds of the other labels)
    (1 - 1e-12, [1e-12, 1e-12, 1e-12, 1e-12]),  # P_t reaches its cap 1 - pl from t = 2
    (1 - 1e-12, [4e-13, 3e-13, 2e-13, 1e-13]),
    (1 - 1e-12, [1e-12 / 3] * 4),  # t > 1 wins
    (1 - 2**-53, [2**-53 / 2, 2**-53 / 4, 1e-20, 0.0]),  # the largest float below 1
    (0.6, [0.3, 0.05, 0.03, 0.02]),  # an ordinary case, for scale
    (1e-3, [1e-4, 1e-5, 1e-6, 1e-7]),  # the label itself is rare
]


@pytest.mark.parametrize("sigma", [1e-3, 0.25, 10.0])
@pytest.mark.parametrize(("pl", "uppers"), EXTREME_BOUNDS)
def test_radius_near_probability_one_matches_50_digit_reference(pl, uppers, sigma):
    """``radius_from_bounds`` agrees with a 50-digit mpmath Theorem 1 to 1e-9 (relative) for
    every k, with the label's probability within 1e-12 (and one ulp) of 1, the others down to
    1e-20 or 0, and sigma from 1e-3 to 10. A probability of exactly 0 elsewhere or a label
    probability of exactly 1 gives inf (nothing bounds the radius), never NaN."""
    ks = (1, 2, 3, 4)
    got = radius_from_bounds([pl], [[1.0, *uppers]], [0], ks, sigma).numpy()[0]
    for k, value in zip(ks, got, strict=True):
        if k == 4 and uppers[-1] == 0.0:
            assert value == np.inf
            continue
        expected = mp_theorem1(pl, uppers, k, sigma)
        assert np.isfinite(value) and abs(value - expected) <= 1e-9 * expected, (k, value)
    exact_one = radius_from_bounds([1.0], [[1.0, *uppers]], [0], ks, sigma).numpy()[0]
    assert np.isposinf(exact_one).all()


# ---------------------------------------------------------------------------- n = 10^7
N7 = 10_000_000


@pytest.mark.parametrize("bounds", ["simuem", "binocp"])
def test_certified_radius_at_n_1e7_matches_50_digit_reference(bounds):
    """n = 10^7 samples with counts at the ends (0 .. 30 and n - 30 .. n): the Clopper-Pearson
    bounds match the roots of the exact binomial tail equation (computed in mpmath as finite
    sums) to 1e-9 relative in the small quantity (p or 1 - p), and the certified radii match a
    50-digit Theorem 1 to 1e-9 for k = 1, 2, 3, 9 (c = 10, alpha = 0.001, sigma = 0.25)."""
    alpha, sigma, c, ks = 0.001, 0.25, 10, (1, 2, 3, 9)
    rows = np.zeros((4, c), dtype=np.int64)
    rows[0, :3] = [N7 - 30, 20, 10]
    rows[1, 0] = N7
    rows[2, :4] = [N7 - 6, 3, 2, 1]
    rows[3, :2] = [N7 - 1, 1]
    got = certified_radius(rows, np.zeros(4, dtype=np.int64), ks, sigma, alpha, bounds).numpy()
    level = alpha / c if bounds == "simuem" else alpha
    for row, radii in zip(rows, got, strict=True):
        pl = mp_cp_lower_near_one(int(row[0]), N7, level)
        ours = clopper_pearson_lower(row[0], N7, level)
        assert abs((1 - ours) - (1 - pl)) <= 1e-9 * (1 - pl)
        if bounds == "simuem":
            uppers = [mp_cp_upper(int(j), N7, level) for j in row[1:]]
            ours_up = clopper_pearson_upper(row[1:], N7, level)
            for a, b in zip(ours_up, uppers, strict=True):
                assert abs(a - b) <= 1e-9 * b
        else:
            uppers = [1 - pl] * (c - 1)
        for k, value in zip(ks, radii, strict=True):
            expected = mp_theorem1(pl, uppers, k, sigma)
            assert abs(value - expected) <= 1e-9 * expected, (row, k, value, expected)


def test_counts_of_1e7_in_the_middle():
    """n = 10^7 with counts in the middle (no closed form): bounds straddle the frequency,
    sit within a few standard errors of it, and the radius grows with k and with alpha."""
    counts = np.array([[5_000_000, 3_000_000, 1_999_990, 10, 0]])
    n = counts.sum()
    se = np.sqrt(counts / n * (1 - counts / n) / n)
    lower = clopper_pearson_lower(counts, n, 1e-3)
    upper = clopper_pearson_upper(counts, n, 1e-3)
    assert (lower <= counts / n).all() and (upper >= counts / n).all()
    assert (counts / n - lower < 4 * se + 1e-6).all() and (upper - counts / n < 4 * se + 1e-6).all()
    radii = [certified_radius(counts, [0], (1, 2, 3), 0.25, a).numpy()[0] for a in (1e-6, 1e-2)]
    assert (np.diff(radii[0]) >= 0).all() and (radii[1] > radii[0]).all()


# ---------------------------------------------------------------------------- sigma scaling
def test_radius_is_exactly_proportional_to_sigma():
    """sigma = 1e-3, 0.25 and 10 give radii that differ only by the factor sigma (to 1e-13):
    nothing in the solver depends on sigma's scale (no absolute tolerances in input units)."""
    rng = np.random.default_rng(5)
    counts = rng.multinomial(100_000, rng.dirichlet(np.ones(8) * 0.5), size=50)
    labels = counts.argmax(axis=1)
    ks = (1, 2, 3, 7)
    base = certified_radius(counts, labels, ks, 1.0, 0.001).numpy()
    assert np.isfinite(base).sum() > 100
    for sigma in (1e-3, 0.25, 10.0):
        scaled = certified_radius(counts, labels, ks, sigma, 0.001).numpy()
        np.testing.assert_allclose(scaled, sigma * base, rtol=1e-13, equal_nan=True)


# ---------------------------------------------------------------------------- c = 2, c = 10^4
def test_two_classes_reduce_to_one_bound():
    """c = 2 at n = 10^7: both estimators reduce to one Clopper-Pearson lower bound pl (at
    alpha / 2 for SimuEM, alpha for BinoCP; the other label's upper bound is 1 - pl by the
    symmetry of the Beta distribution) and R = sigma Phi^-1(pl), to 1e-9 against mpmath."""
    counts = np.array([[N7 - 5, 5], [N7 // 2 + 20_000, N7 // 2 - 20_000]])
    for bounds, level in (("simuem", 0.0005), ("binocp", 0.001)):
        got = certified_radius(counts, [0, 0], 1, 0.5, 0.001, bounds).numpy()[:, 0]
        pl = mp_cp_lower_near_one(N7 - 5, N7, level)
        assert abs(got[0] - float(0.5 * mp_ppf(pl))) <= 1e-9 * got[0]
        pl_mid = float(clopper_pearson_lower(counts[1, 0], N7, level))
        np.testing.assert_allclose(got[1], 0.5 * float(mp_ppf(pl_mid)), rtol=1e-9)


def scalar_theorem1(pl: float, uppers: np.ndarray, k: int, sigma: float) -> float:
    """Theorem 1 with float64 inputs through the mpmath reference (for a few (row, k))."""
    return mp_theorem1(float(pl), [float(u) for u in uppers], k, sigma)


@pytest.mark.slow
def test_ten_thousand_classes():
    """c = 10,000 (n = 100,000, Dirichlet(0.02) probabilities): SimuEM's per-label level is
    alpha / 10,000; radii for k = 1, 2, 10, 100 match the mpmath reference to 1e-9; radii for
    k up to 9,999 are computed (non-decreasing in k, finite or NaN); ``top_k_set`` is sound on
    the same counts (its sets are the k largest counts, or -1)."""
    c, n, alpha, sigma = 10_000, 100_000, 0.001, 0.5
    rng = np.random.default_rng(10_000)
    p = rng.dirichlet(np.full(c, 0.02), size=3)
    counts = np.stack([rng.multinomial(n, row) for row in p])
    order = np.argsort(-counts, axis=1)
    labels = np.array([order[0, 0], order[1, 1], order[2, 0]])
    ks = (1, 2, 10, 100, 1_000, 9_999)
    got = certified_radius(counts, labels, ks, sigma, alpha).numpy()
    assert np.isfinite(got[:, :4]).sum() >= 6  # both branches (certified or not) are covered
    assert (np.diff(np.nan_to_num(got, nan=-1.0), axis=1) >= -1e-12).all()
    level = alpha / c
    for row, label, radii in zip(counts, labels, got, strict=True):
        pl = clopper_pearson_lower(row[label], n, level)
        others = np.delete(row, label)
        top = np.sort(others)[::-1][:100]
        uppers = clopper_pearson_upper(top, n, level)
        for k, value in zip(ks[:4], radii[:4], strict=True):
            expected = scalar_theorem1(pl, uppers, k, sigma)
            if np.isnan(expected):
                assert np.isnan(value), (k, value)
            else:
                assert abs(value - expected) <= 1e-9 * expected, (k, value, expected)
    sets = top_k_set(torch.from_numpy(counts), 5, alpha).numpy()
    for row, chosen in zip(counts, sets, strict=True):
        if chosen[0] >= 0:
            assert set(chosen.tolist()) == set(np.argsort(-row, kind="stable")[:5].tolist())


# ---------------------------------------------------------------------------- noise precision
class Recorder(nn.Module):
    """A linear model that keeps a copy of every input it receives, before autocast touches
    anything, and the dtype of its output."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(dim, num_classes)
        self.inputs: list[torch.Tensor] = []
        self.output_dtypes: set[torch.dtype] = set()

    def forward(self, z):
        self.inputs.append(z.detach().clone())
        out = self.linear(z.flatten(1).float())  # autocast leaves float64 alone: cast it
        self.output_dtypes.add(out.dtype)
        return out


def sampled_noise(
    sigma: float, x_dtype: torch.dtype, autocast, dim=64, batch=4, n=1024, batch_size=512
):
    """Every input the model received while sampling x = 0 (so they are the noise itself).

    An explicit ``batch_size`` skips the sampler's batch-size tuning, whose timing passes
    would otherwise be recorded too; ``batch_size=None`` includes them.
    """
    model = Recorder(dim, 3)
    smoothed = SmoothedClassifier(model, num_classes=3, sigma=sigma, autocast_dtype=autocast)
    x = torch.zeros(batch, dim, dtype=x_dtype)
    smoothed.sample_counts(x, n=n, seed=11, batch_size=batch_size)
    return torch.cat(model.inputs), model.output_dtypes


@pytest.mark.parametrize("sigma", [1e-3, 0.25, 10.0])
def test_noise_is_float32_gaussian_under_bf16_autocast(sigma):
    """With ``autocast_dtype=torch.bfloat16`` the model computes in bf16 (its outputs are bf16)
    but every noisy input it receives is float32, and the noise (x = 0, 4 x 1024 x 64 values)
    has the statistics of N(0, sigma^2) in float32: mean and variance within 5 standard errors,
    Kolmogorov-Smirnov p > 1e-3, no correlation between neighbouring pixels, and under 1% of
    the values representable in bf16 (if the noise were drawn in bf16, all of them would be)."""
    noise, out_dtypes = sampled_noise(sigma, torch.float32, torch.bfloat16)
    assert out_dtypes == {torch.bfloat16}  # autocast really ran the model in bf16
    assert noise.dtype == torch.float32
    values = noise.double().flatten().numpy() / sigma
    m = values.size
    assert abs(values.mean()) < 5 / np.sqrt(m)
    assert abs(values.var() - 1) < 5 * np.sqrt(2 / m)
    assert kstest(values[:50_000], "norm").pvalue > 1e-3
    neighbours = np.corrcoef(noise[:, :-1].flatten().numpy(), noise[:, 1:].flatten().numpy())
    assert abs(neighbours[0, 1]) < 5 / np.sqrt(m)
    in_bf16 = (noise.to(torch.bfloat16).float() == noise).float().mean().item()
    assert in_bf16 < 0.01
    assert len(torch.unique(noise.flatten())) > 0.99 * m  # no repeated noise streams


@pytest.mark.parametrize(
    ("x_dtype", "noise_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_noise_is_never_narrower_than_float32(x_dtype, noise_dtype):
    """Whatever the input's dtype (bf16 and fp16 images included) and with bf16 autocast on,
    the model receives x + noise in float32 or wider (float64 inputs keep float64), also in
    the passes that tune the batch size when none is given (bf16 inputs)."""
    for batch_size in (100, None) if x_dtype == torch.bfloat16 else (100,):
        noise, _ = sampled_noise(
            0.25, x_dtype, torch.bfloat16, batch=2, n=256, batch_size=batch_size
        )
        assert noise.dtype == noise_dtype
    noise, _ = sampled_noise(0.25, x_dtype, torch.bfloat16, batch=2, n=256)
    assert (noise.to(torch.bfloat16).to(noise_dtype) == noise).float().mean().item() < 0.01


def test_small_sigma_keeps_the_input():
    """sigma = 1e-3 on a mid-grey float32 input: noisy inputs are x + noise with the noise
    resolved to float32 precision at 0.5 (6e-8, i.e. 6e-5 sigma), so their spread is sigma to
    within sampling error and their mean is x."""
    model = Recorder(16, 3)
    smoothed = SmoothedClassifier(model, num_classes=3, sigma=1e-3)
    smoothed.sample_counts(torch.full((2, 16), 0.5), n=2048, seed=4, batch_size=512)
    noisy = torch.cat(model.inputs).double()
    m = noisy.numel()
    assert abs(noisy.mean().item() - 0.5) < 5e-3 / np.sqrt(m)
    assert abs(noisy.std().item() / 1e-3 - 1) < 5 * np.sqrt(1 / (2 * m))
