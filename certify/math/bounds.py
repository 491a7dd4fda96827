"""Exact one-sided Clopper-Pearson bounds and the paper's SimuEM and BinoCP estimators.

SciPy's inverse regularised incomplete Beta (no normal approximation), vectorised over arrays
of counts; definitions in ``docs/topk-certification.md``, "Bounds from Monte Carlo counts".
"""

from __future__ import annotations

from functools import partial

import numpy as np
from scipy.special import betainccinv, betaincinv

from certify.math.validation import UsageError, check_alpha, check_counts, check_labels


def _lower_one(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    out = np.zeros(k.shape, dtype=np.float64)
    pos = k > 0
    out[pos] = betaincinv(k[pos], n[pos] - k[pos] + 1, level)
    return out


def _upper_one(k: np.ndarray, n: np.ndarray, level: float) -> np.ndarray:
    # The complementary inverse takes the upper tail's level as it is: neither 1 - level nor
    # 1 - lower(n - k) is formed, both of which lose the digits of a small level or bound.
    out = np.ones(k.shape, dtype=np.float64)
    below = k < n
    out[below] = betainccinv(k[below] + 1, n[below] - k[below], level)
    return out


def _unique_apply(fn, counts, n, level: float) -> np.ndarray:
    """``fn(counts, n, level)`` once per distinct (count, n) pair, scattered back (counts repeat
    a lot: millions of Beta inversions become a few thousand)."""
    shape = np.broadcast_shapes(np.shape(counts), np.shape(n))
    counts, n = (np.asarray(a, dtype=np.int64).ravel() for a in np.broadcast_arrays(counts, n))
    base = int(n.max(initial=0)) + 1
    if base < 3_000_000_000:  # one int64 key per pair: much faster than unique over axis 1
        keys, inverse = np.unique(counts * base + n, return_inverse=True)
        uniq_counts, uniq_n = np.divmod(keys, base)
    else:
        uniq, inverse = np.unique(np.stack([counts, n]), axis=1, return_inverse=True)
        uniq_counts, uniq_n = uniq
    return fn(uniq_counts, uniq_n, level)[inverse.ravel()].reshape(shape)


#: Clopper-Pearson lower / upper bounds of valid integer counts out of n (broadcast), unchecked.
_lower = partial(_unique_apply, _lower_one)
_upper = partial(_unique_apply, _upper_one)


def _checked(counts, n, level: float) -> tuple[np.ndarray, np.ndarray]:
    counts, n = np.asarray(counts), np.asarray(n)
    if not (np.issubdtype(counts.dtype, np.integer) and np.issubdtype(n.dtype, np.integer)):
        raise UsageError(f"counts and n must be integers, got {counts.dtype} and {n.dtype}")
    if (counts < 0).any() or (counts > n).any():
        raise UsageError("counts must lie in 0..n")
    check_alpha(level, name="level")
    return counts, n


def clopper_pearson_lower(counts, n, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: P(p < bound) <= ``level``.

    Args:
        counts: integer array of successes.
        n: integer array (broadcastable to ``counts``) of trials.
        level: one-sided miss probability in (0, 1).

    Returns:
        float64 array of the broadcast shape; exactly 0 where ``counts == 0``.

    Example:
        >>> float(clopper_pearson_lower(10, 10, 0.05).round(6))
        0.741134
    """
    return _lower(*_checked(counts, n, level), level)


def clopper_pearson_upper(counts, n, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: P(p > bound) <= ``level``; exactly 1 where
    ``counts == n``. Arguments as ``clopper_pearson_lower``."""
    return _upper(*_checked(counts, n, level), level)


def simuem_bounds(counts, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's SimuEM (before clipping): every label's lower and upper bound at ``alpha / c``.

    By Bonferroni, every bound used holds at once with probability at least ``1 - alpha``.

    Args:
        counts: ``(B, c)`` integer counts; the row sums are the sample sizes.
        alpha: overall failure probability.

    Returns:
        ``(lower, upper)``, two float64 ``(B, c)`` arrays.
    """
    return _simuem(check_counts(counts), check_alpha(alpha))


def _simuem(counts: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    n, level = counts.sum(axis=1, keepdims=True), alpha / counts.shape[1]
    return _lower(counts, n, level), _upper(counts, n, level)


def binocp_bounds(counts, labels, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's BinoCP: a Clopper-Pearson lower bound for ``labels`` at level ``alpha``, and
    ``1 - lower`` as every other label's upper bound.

    Returns:
        ``(p_lower (B,), upper (B, c))``; the entry of the label itself in ``upper`` is 1.
    """
    counts = check_counts(counts)
    check_alpha(alpha)
    labels = check_labels(labels, counts.shape[0], counts.shape[1])
    rows = np.arange(counts.shape[0])
    p_lower = _lower(counts[rows, labels], counts.sum(axis=1), alpha)
    upper = np.repeat((1.0 - p_lower)[:, None], counts.shape[1], axis=1)
    upper[rows, labels] = 1.0
    return p_lower, upper
