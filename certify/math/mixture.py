"""Anytime-valid bounds of Bernoulli means: the Beta-mixture confidence sequence.

For a label's indicator stream X_1, X_2, ... (i.i.d. Bernoulli(p)) and a Beta(a, b) prior fixed
before the stream is read, the mixture of likelihood ratios

    M_m(q) = B(a + F, b + m - F) / B(a, b) / (q^F (1 - q)^(m - F))      (F ones in m draws)

is a nonnegative martingale of mean 1 when q = p, so by Ville's inequality
P(M_m(p) >= 1 / level for some m) <= level. The confidence sequence {q : M_m(q) < 1 / level}
therefore holds at every m at once: a stream may be looked at after every draw and stopped at
any time. ``docs/sequential.md``, "The mixture confidence sequence".
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaln

_STEPS = 52  # bisection steps: the interval [0, 1] shrinks below 2^-52


def mixture_bounds(
    ones: np.ndarray, draws, prior_a: np.ndarray, prior_b: np.ndarray, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends of the Beta-mixture confidence sequence at ``level``.

    Args:
        ones: integer array F of successes; ``draws`` (broadcast) the trials m.
        prior_a, prior_b: the Beta prior's parameters (broadcast), fixed before these draws.
        level: the probability that the sequence ever misses p, in (0, 1).

    Returns:
        ``(lower, upper)`` float64 arrays; each end is a point just outside the sequence, so the
        bounds are never tighter than the exact ones (0 where ``F = 0``, 1 where ``F = m``).

    Example:
        >>> lo, up = mixture_bounds(np.array([990]), 1000, np.array([1.0]), np.array([1.0]), 0.01)
        >>> [round(float(lo[0]), 4), round(float(up[0]), 4)]
        [0.9697, 0.9983]
    """
    ones = np.asarray(ones, dtype=np.float64)
    draws = np.broadcast_to(np.asarray(draws, dtype=np.float64), ones.shape)
    zeros = draws - ones
    log_marginal = betaln(prior_a + ones, prior_b + zeros) - betaln(prior_a, prior_b)  # log M * L
    threshold = -np.log(level)

    def outside(q):  # log M_m(q) >= log(1 / level)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_lik = np.where(ones > 0, ones * np.log(q), 0.0)
            log_lik += np.where(zeros > 0, zeros * np.log1p(-q), 0.0)
        return log_marginal - log_lik >= threshold

    mean = np.divide(ones, draws, out=np.full(ones.shape, 0.5), where=draws > 0)
    # Lower end in [out_lo, in_lo]: out_lo outside the sequence, in_lo = mean inside; and
    # symmetrically for the upper end. log M decreases to its minimum (<= 0) at the mean.
    out_lo, in_lo = np.zeros_like(mean), mean.copy()
    in_up, out_up = mean.copy(), np.ones_like(mean)
    for _ in range(_STEPS):
        mid = 0.5 * (out_lo + in_lo)
        out = outside(mid)
        out_lo, in_lo = np.where(out, mid, out_lo), np.where(out, in_lo, mid)
        mid = 0.5 * (in_up + out_up)
        out = outside(mid)
        in_up, out_up = np.where(out, in_up, mid), np.where(out, mid, out_up)
    lower = np.where(ones > 0, out_lo, 0.0)
    upper = np.where(zeros > 0, out_up, 1.0)
    return lower, upper
