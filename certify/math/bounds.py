"""Confidence bounds on label probabilities from Monte Carlo counts.

Everything here is exact (SciPy's regularised incomplete Beta inverse, no normal
approximation), vectorised over arrays of counts, and free of Lightning and torch so that it
can be checked on its own. See ``docs/topk-certification.md`` in the shared folder for the
definitions.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betainccinv, betaincinv

from certify.math.validation import check_alpha, check_counts, check_labels

BOUNDS = ("simuem", "binocp")


def _unique_apply(fn, counts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Evaluate ``fn(counts, n)`` once per distinct (count, n) pair and scatter back.

    Counts are small integers repeated many times (most labels get 0 or a handful of
    samples), so this turns millions of Beta inversions into a few thousand.
    """
    shape = np.broadcast_shapes(np.shape(counts), np.shape(n))
    counts, n = (np.asarray(a, dtype=np.int64).ravel() for a in np.broadcast_arrays(counts, n))
    base = int(n.max(initial=0)) + 1
    if base < 3_000_000_000:  # one int64 key per pair: much faster than unique over axis 1
        keys, inverse = np.unique(counts * base + n, return_inverse=True)
        uniq_counts, uniq_n = np.divmod(keys, base)
    else:
        uniq, inverse = np.unique(np.stack([counts, n]), axis=1, return_inverse=True)
        uniq_counts, uniq_n = uniq
    return fn(uniq_counts, uniq_n)[inverse.ravel()].reshape(shape)


def _lower(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    out = np.zeros(k.shape, dtype=np.float64)
    pos = k > 0
    out[pos] = betaincinv(k[pos], n[pos] - k[pos] + 1, level)
    return out


def _upper(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    # The complementary inverse takes the upper tail's level as it is: neither 1 - level
    # (which would round away a tiny level's digits) nor 1 - lower(n - k) (which loses the
    # digits of a small bound, e.g. 1 - a^(1/n) for k = 0 and large n) is ever formed.
    out = np.ones(k.shape, dtype=np.float64)
    below = k < n
    out[below] = betainccinv(k[below] + 1, n[below] - k[below], level)
    return out


def clopper_pearson_lower(counts, n, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: P(p < bound) <= ``level``.

    Args:
        counts: integer array of successes.
        n: integer array (broadcastable to ``counts``) of trials.
        level: one-sided miss probability in (0, 1).

    Returns:
        float64 array shaped like ``counts``; exactly 0 where ``counts == 0``.

    Example:
        >>> float(clopper_pearson_lower(10, 10, 0.05).round(6))
        0.741134
    """
    counts, n = _as_counts_and_trials(counts, n)
    check_alpha(level, name="level")
    return _unique_apply(lambda k, m: _lower(k, m, level), counts, n)


def clopper_pearson_upper(counts, n, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: P(p > bound) <= ``level``.

    Exactly 1 where ``counts == n``.

    Example:
        >>> float(clopper_pearson_upper(0, 10, 0.05).round(6))
        0.258866
    """
    counts, n = _as_counts_and_trials(counts, n)
    check_alpha(level, name="level")
    return _unique_apply(lambda k, m: _upper(k, m, level), counts, n)


def _as_counts_and_trials(counts, n) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(counts)
    n = np.asarray(n)
    if not (np.issubdtype(counts.dtype, np.integer) and np.issubdtype(n.dtype, np.integer)):
        raise ValueError(f"counts and n must be integers, got {counts.dtype} and {n.dtype}")
    counts, n = np.broadcast_arrays(counts.astype(np.int64), n.astype(np.int64))
    if (counts < 0).any() or (counts > n).any():
        raise ValueError("counts must lie in 0..n")
    return counts, n


def simuem_bounds(counts, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Simultaneous bounds for every label (the paper's SimuEM, before clipping).

    Each label gets a one-sided Clopper-Pearson lower and upper bound at level ``alpha / c``;
    by Bonferroni, with probability at least ``1 - alpha`` every lower bound and every upper
    bound that is used holds at once.

    Args:
        counts: ``(B, c)`` integer counts; the row sums are the sample sizes.
        alpha: overall failure probability.

    Returns:
        ``(lower, upper)``, two float64 ``(B, c)`` arrays.

    Example:
        >>> lo, up = simuem_bounds([[90, 10, 0]], alpha=0.001)
        >>> bool(lo[0, 0] < 0.9 < up[0, 0]), float(lo[0, 2]), bool(up[0, 2] > 0)
        (True, 0.0, True)
    """
    counts = check_counts(counts)
    check_alpha(alpha)
    n = counts.sum(axis=1, keepdims=True)
    level = alpha / counts.shape[1]
    lower = _unique_apply(lambda k, m: _lower(k, m, level), counts, n)
    upper = _unique_apply(lambda k, m: _upper(k, m, level), counts, n)
    return lower, upper


def binocp_bounds(counts, labels, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's BinoCP: one Clopper-Pearson lower bound for ``labels`` at level ``alpha``.

    Every other label's upper bound is ``1 - lower``, the weakest statement the lower bound
    allows.

    Returns:
        ``(p_lower, upper)``: ``(B,)`` lower bounds of the labels' probabilities and a
        ``(B, c)`` array of upper bounds of all labels (the entry of the label itself is 1).

    Example:
        >>> pl, up = binocp_bounds([[95, 5]], [0], alpha=0.001)
        >>> bool(abs(pl[0] + up[0, 1] - 1) < 1e-15)
        True
    """
    counts = check_counts(counts)
    check_alpha(alpha)
    labels = check_labels(labels, counts.shape[0], counts.shape[1])
    n = counts.sum(axis=1)
    rows = np.arange(counts.shape[0])
    p_lower = _unique_apply(lambda k, m: _lower(k, m, alpha), counts[rows, labels], n)
    upper = np.repeat((1.0 - p_lower)[:, None], counts.shape[1], axis=1)
    upper[rows, labels] = 1.0
    return p_lower, upper
