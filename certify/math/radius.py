"""Theorem 1 of Jia et al. (ICLR 2020): the certified top-k radius of a label.

Each ``R_t`` of the theorem is found exactly (closed form for ``t = 1``, else a safeguarded
Newton iteration on its log form, to ~1e-13), vectorised over examples, k and t; the statement
and its bounds are in ``docs/topk-certification.md``, "Theorem 1".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.special import log_ndtr, ndtri

from certify.math.bounds import _lower, _upper
from certify.math.validation import (
    UsageError,
    check_alpha,
    check_bounds,
    check_counts,
    check_labels,
    check_sigma,
    check_top_k,
    to_numpy,
)

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


def _log_mills(y: np.ndarray) -> np.ndarray:  # log(phi(y) / Phi(y)), in both tails
    return -0.5 * y * y - _LOG_SQRT_2PI - log_ndtr(y)


def _solve_t(z_l: np.ndarray, z_t: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Root x >= 0 of g(x) = log Phi(z_l - x) - log Phi(z_t + x) + log t (finite inputs,
    g(0) > 0); g decreases strictly, the root lies in [0, z_l - Phi^-1(Phi(z_t) / t)]."""
    log_t = np.log(t)
    lo = np.zeros_like(z_l)
    hi = z_l - ndtri(np.exp(log_ndtr(z_t) - log_t))
    x = np.where(t == 1, 0.5 * (z_l - z_t), 0.5 * (lo + hi))
    todo = t > 1
    for _ in range(200):
        if not todo.any():
            break
        xs, zl, zt = x[todo], z_l[todo], z_t[todo]
        g = log_ndtr(zl - xs) - log_ndtr(zt + xs) + log_t[todo]
        dg = -np.exp(_log_mills(zl - xs)) - np.exp(_log_mills(zt + xs))
        lo_s = np.where(g > 0, xs, lo[todo])
        hi_s = np.where(g > 0, hi[todo], xs)
        new = xs - np.where(dg < 0, g / dg, 0.0)
        outside = (new < lo_s) | (new > hi_s) | (dg >= 0)
        new = np.where(outside, 0.5 * (lo_s + hi_s), new)
        new = np.where(g == 0, xs, new)  # landed on the root exactly
        done = (np.abs(new - xs) <= 1e-13 * (1.0 + np.abs(xs))) | (hi_s - lo_s <= 1e-15)
        x[todo], lo[todo], hi[todo] = new, lo_s, hi_s
        todo[np.flatnonzero(todo)[done]] = False
    return x


def _radius_from_sorted_uppers(
    p_lower: np.ndarray, uppers_desc: np.ndarray, top_k: tuple[int, ...], sigma: float
) -> np.ndarray:
    """Radii ``(B, len(top_k))`` from ``p_lower`` ``(B,)`` and the other labels' largest upper
    bounds sorted in descending order ``(B, max(top_k))``; NaN where not certified."""
    cap = 1.0 - p_lower  # (B,)
    u = np.minimum(uppers_desc, cap[:, None])  # (B, K) clipped, descending
    sums, ts, group = [], [], []
    for j, k in enumerate(top_k):
        ascending = u[:, :k][:, ::-1]  # (B, k): u_(1) <= ... <= u_(k)
        sums.append(np.minimum(np.cumsum(ascending, axis=1), cap[:, None]))
        ts.append(np.arange(1, k + 1))
        group.append(np.full(k, j))
    big_p = np.concatenate(sums, axis=1)  # (B, T)
    t = np.broadcast_to(np.concatenate(ts), big_p.shape).astype(np.float64)  # (B, T)
    group = np.concatenate(group)  # (T,)
    pl = np.broadcast_to(p_lower[:, None], big_p.shape)  # (B, T)

    certified = pl > big_p / t
    with np.errstate(divide="ignore"):
        z_l, z_t = ndtri(pl), ndtri(big_p)
    x = np.full(big_p.shape, -np.inf)
    unbounded = certified & (np.isinf(z_l) | np.isinf(z_t))
    x[unbounded] = np.inf
    finite = certified & ~unbounded
    x[finite] = _solve_t(z_l[finite], z_t[finite], t[finite])

    radius = np.stack([x[:, group == j].max(axis=1) for j in range(len(top_k))], axis=1)
    with np.errstate(over="ignore"):
        scaled = radius * sigma
    # A finite radius beyond float64 (sigma near 1e308) is the largest float, never infinity.
    scaled[np.isinf(scaled) & np.isfinite(radius)] = np.finfo(np.float64).max
    scaled[np.isneginf(radius)] = np.nan
    return scaled


def _top_uppers_excluding(values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of each row, the label's own entry left out, descending."""
    masked = torch.from_numpy(np.array(values, copy=True))
    masked[torch.arange(masked.shape[0]), torch.from_numpy(labels)] = -1
    return masked.topk(k, dim=1).values.numpy()  # (B, k)


def _radius(p_lower: np.ndarray, upper: np.ndarray, labels: np.ndarray, top_k, sigma: float):
    """``radius_from_bounds`` without its checks: radii ``(B, K)`` from ``(B,)``, ``(B, c)``."""
    uppers = _top_uppers_excluding(upper, labels, max(top_k))  # (B, max k) descending
    return _radius_from_sorted_uppers(p_lower, uppers, top_k, sigma)


def radius_from_bounds(
    p_lower, upper, labels, top_k: int | Sequence[int], sigma: float
) -> torch.Tensor:
    """Theorem 1 radius from given probability bounds (or exact probabilities).

    Args:
        p_lower: ``(B,)`` lower bounds of the probabilities of ``labels``.
        upper: ``(B, c)`` upper bounds of every label's probability (the label's own
            entry is ignored).
        labels: ``(B,)`` the labels to certify.
        top_k: one k or several.
        sigma: noise level.

    Returns:
        float64 ``(B, len(top_k))`` radii; NaN where the label is not certified, ``inf``
        where nothing bounds it (``p_lower == 1`` or the other labels have probability 0).
    """
    upper = np.asarray(to_numpy(upper), dtype=np.float64)
    p_lower = np.asarray(to_numpy(p_lower), dtype=np.float64)
    if upper.ndim != 2 or p_lower.shape != (upper.shape[0],):
        raise UsageError(
            f"p_lower must be (B,) and upper (B, c), got {p_lower.shape} and {upper.shape}"
        )
    top_k = check_top_k(top_k, upper.shape[1])
    labels = check_labels(labels, upper.shape[0], upper.shape[1])
    return torch.from_numpy(_radius(p_lower, upper, labels, top_k, check_sigma(sigma)))


def certified_radius(
    counts,
    labels,
    top_k: int | Sequence[int],
    sigma: float,
    alpha: float,
    bounds: str = "simuem",
) -> torch.Tensor:
    """Certified top-k radius of ``labels`` from Monte Carlo counts (CERTIFY of the paper).

    With probability at least ``1 - alpha``, each label stays in the smoothed top-k within
    its radius.

    Args:
        counts: ``(B, c)`` integer counts of the base classifier on noisy copies of each input.
        labels: ``(B,)`` the label to certify for each row.
        top_k: one k or a sequence; each must satisfy ``1 <= k < c``.
        sigma: the noise level the counts were sampled with.
        alpha: the probability that a returned radius is wrong.
        bounds: ``"simuem"`` or ``"binocp"`` (``docs/topk-certification.md``).

    Returns:
        float64 tensor ``(B, len(top_k))``, NaN where the label is not certified (abstain).

    Example:
        >>> counts = [[2, 2, 334, 93642, 2, 5279, 737, 0, 2, 0]]
        >>> r = certified_radius(counts, [3], top_k=(1, 3), sigma=0.25, alpha=0.001)
        >>> [round(v, 4) for v in r[0].tolist()]
        [0.3871, 0.5505]
    """
    counts = check_counts(counts)
    batch, num_classes = counts.shape
    labels = check_labels(labels, batch, num_classes)
    top_k = check_top_k(top_k, num_classes)
    sigma, alpha, bounds = check_sigma(sigma), check_alpha(alpha), check_bounds(bounds)
    kmax = max(top_k)
    n = counts.sum(axis=1)  # (B,)
    n_label = counts[np.arange(batch), labels]  # (B,)
    if bounds == "simuem":
        level = alpha / num_classes
        p_lower = _lower(n_label, n, level)  # (B,)
        top_counts = _top_uppers_excluding(counts, labels, kmax)  # (B, K) descending
        uppers = _upper(top_counts, n[:, None], level)  # (B, K)
    else:
        p_lower = _lower(n_label, n, alpha)  # (B,)
        uppers = np.repeat((1.0 - p_lower)[:, None], kmax, axis=1)  # (B, K)
    return torch.from_numpy(_radius_from_sorted_uppers(p_lower, uppers, top_k, sigma))
