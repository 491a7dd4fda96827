"""PREDICT of the smoothed top-k classifier from Monte Carlo counts: ``top_k_set`` from one
sample, ``certified_prediction`` with a radius per label from a second one
(``docs/topk-certification.md``, "PREDICT with a certified radius per label")."""

from __future__ import annotations

import numpy as np
import torch

from certify.math.bounds import _lower, _simuem, _upper
from certify.math.radius import _radius
from certify.math.validation import (
    UsageError,
    check_alpha,
    check_counts,
    check_sigma,
    check_top_k,
    to_numpy,
)


def top_k_set(counts: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """PREDICT from counts: the top-k labels when simultaneously separated, else -1s."""
    counts = check_counts(counts)  # (B, c)
    (k,) = check_top_k(k, counts.shape[1])
    lower, upper = (torch.from_numpy(b) for b in _simuem(counts, check_alpha(alpha)))  # (B, c)
    order = torch.from_numpy(counts).argsort(dim=1, descending=True, stable=True)  # (B, c)
    inside, outside = order[:, :k], order[:, k:]
    lowest_inside = lower.gather(1, inside).min(dim=1).values  # (B,)
    separated = lowest_inside > upper.gather(1, outside).max(dim=1).values  # (B,)
    return torch.where(separated[:, None], inside, torch.full_like(inside, -1))


def select_top_k(selection_counts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k labels with the most selection counts, and whether the counts single them out.

    Returns:
        ``(labels (B, k) int64, separated (B,) bool)``: labels by decreasing count (a tie
        ordered by label); ``separated`` is False where the k-th and (k+1)-th counts tie.
    """
    counts = check_counts(selection_counts)  # (B, c)
    return _select(torch.from_numpy(counts), *check_top_k(k, counts.shape[1]))


def _select(counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ordered, order = counts.sort(dim=1, descending=True, stable=True)  # (B, c), (B, c)
    return order[:, :k], ordered[:, k - 1] > ordered[:, k]


def bound_level(alpha: float, num_classes: int, k: int) -> float:
    """The level of each one-sided bound of ``certified_prediction``: alpha over the number of
    bounds used, ``c`` for k = 1 and ``c + k`` for k >= 2 (the set's labels need upper bounds)."""
    return alpha / (num_classes + (k if k > 1 else 0))


def certified_prediction(
    selection_counts, counts, k: int, sigma: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed top-k set with a certified radius per label, or an abstention.

    With probability at least ``1 - alpha`` over the fresh sample, whatever the selection
    sample, an answer is the smoothed top-k set and each of its labels stays in the top-k
    within its radius, all at once. Abstention (labels -1, radii NaN): a tie at the k-th
    selection count, or a chosen label not certified at radius 0.

    Args:
        selection_counts: ``(B, c)`` counts of the selection sample (n0 samples per row).
        counts: ``(B, c)`` counts of the independent fresh sample (rows of ties not read).
        k: the size of the label set, ``1 <= k < c``.
        sigma: the noise level of both samples.
        alpha: the probability that an answer or a radius is wrong.

    Returns:
        ``(labels (B, k) int64, radii (B, k) float64)``, labels by decreasing selection count.

    Example:
        >>> labels, radii = certified_prediction([[90, 10, 0]], [[900, 95, 5]], 1, 0.5, 0.001)
        >>> labels.tolist(), round(radii.item(), 4)
        ([[0]], 0.5557)
    """
    selection = check_counts(selection_counts)  # (B, c)
    num_classes = selection.shape[1]
    (k,) = check_top_k(k, num_classes)
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    counts = to_numpy(counts)
    if counts.shape != selection.shape:
        raise UsageError(
            f"counts must have the selection counts' shape {selection.shape}, got {counts.shape}"
        )
    labels, separated = _select(torch.from_numpy(selection), k)  # (B, k), (B,)
    radii = torch.full(labels.shape, float("nan"), dtype=torch.float64)  # (B, k)
    rows = separated.numpy()
    if rows.any():
        fresh = check_counts(counts[rows])  # (S, c)
        chosen = labels.numpy()[rows]  # (S, k)
        level = bound_level(alpha, num_classes, k)
        n = fresh.sum(axis=1, keepdims=True)  # (S, 1)
        lower = _lower(np.take_along_axis(fresh, chosen, 1), n, level)  # (S, k)
        upper = _upper(fresh, n, level)  # (S, c)
        # one row per (example, chosen label): its lower bound against every upper bound
        radius = _radius(
            lower.reshape(-1), np.repeat(upper, k, axis=0), chosen.reshape(-1), (k,), sigma
        )  # (S * k, 1)
        radii[torch.from_numpy(rows)] = torch.from_numpy(radius).view(-1, k)
    answered = ~radii.isnan().any(dim=1)  # (B,)
    labels = torch.where(answered[:, None], labels, torch.full_like(labels, -1))
    return labels, radii.where(answered[:, None], torch.full_like(radii, float("nan")))
