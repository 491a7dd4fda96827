"""PREDICT of the smoothed top-k classifier from Monte Carlo counts.

- ``top_k_set``: the top-k label set from one sample, or an abstention.
- ``certified_prediction``: the top-k label set chosen on a selection sample and a certified
  radius for each of its labels from a second, independent sample, or an abstention
  (``docs/topk-certification.md``, "PREDICT with a certified radius per label").
"""

from __future__ import annotations

import numpy as np
import torch

from certify.math.bounds import _lower, _unique_apply, _upper, simuem_bounds
from certify.math.radius import radius_from_bounds
from certify.math.validation import (
    check_alpha,
    check_counts,
    check_sigma,
    check_top_k,
    to_numpy,
)


def top_k_set(counts: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """PREDICT from counts: the top-k labels when simultaneously separated, else -1s."""
    counts = torch.as_tensor(check_counts(counts))  # (B, c)
    (k,) = check_top_k(k, counts.shape[1])
    check_alpha(alpha)
    lower, upper = (torch.from_numpy(b) for b in simuem_bounds(counts, alpha))
    order = counts.argsort(dim=1, descending=True, stable=True)  # (B, c)
    inside, outside = order[:, :k], order[:, k:]
    separated = (
        lower.gather(1, inside).min(dim=1).values > upper.gather(1, outside).max(dim=1).values
    )  # (B,)
    return torch.where(separated[:, None], inside, torch.full_like(inside, -1))


def select_top_k(selection_counts, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k labels with the most selection counts, and whether the counts single them out.

    Args:
        selection_counts: ``(B, c)`` counts of the selection sample.
        k: the size of the label set, ``1 <= k < c``.

    Returns:
        ``(labels (B, k) int64, separated (B,) bool)``: labels by decreasing count (a tie
        ordered by label); ``separated`` is False where the k-th and the (k+1)-th largest
        counts are equal, so that the counts do not say which labels make the top k.

    Example:
        >>> labels, separated = select_top_k([[5, 90, 5], [2, 95, 3]], k=2)
        >>> labels.tolist(), separated.tolist()
        ([[1, 0], [1, 2]], [False, True])
    """
    counts = torch.from_numpy(check_counts(selection_counts))  # (B, c)
    (k,) = check_top_k(k, counts.shape[1])
    ordered, order = counts.sort(dim=1, descending=True, stable=True)  # (B, c), (B, c)
    return order[:, :k], ordered[:, k - 1] > ordered[:, k]


def bound_level(alpha: float, num_classes: int, k: int) -> float:
    """The level of each one-sided bound of ``certified_prediction``: alpha over the number of
    bounds used, ``c`` for k = 1 (the label's lower bound, the others' upper bounds) and
    ``c + k`` for k >= 2 (the labels of the set need an upper bound as well)."""
    return alpha / (num_classes + (k if k > 1 else 0))


def certified_prediction(
    selection_counts, counts, k: int, sigma: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smoothed top-k set with a certified radius per label, or an abstention.

    The k labels are the most frequent ones of the selection sample (``select_top_k``); the
    fresh ``counts`` bound every label's probability (one-sided Clopper-Pearson bounds at level
    ``bound_level``: a lower bound for each chosen label, an upper bound for every label) and
    each chosen label l gets Theorem 1's radius against all other labels. With probability at
    least ``1 - alpha`` over the fresh sample, whatever the selection sample: an answer is the
    top-k set of the smoothed classifier and every label l of it stays in the top-k for every
    perturbation of l2 norm below its radius, all labels at once.

    The answer is an abstention (labels -1, radii NaN) where the selection counts do not single
    out k labels (a tie at the k-th place) or some chosen label is not certified at radius 0.

    Args:
        selection_counts: ``(B, c)`` counts of the selection sample (n0 samples per row).
        counts: ``(B, c)`` counts of the independent fresh sample (n per row); the rows of
            examples whose selection counts tie at the k-th place are not read.
        k: the size of the label set, ``1 <= k < c``.
        sigma: the noise level of both samples.
        alpha: the probability that an answer or a radius is wrong.

    Returns:
        ``(labels (B, k) int64, radii (B, k) float64)``, labels by decreasing selection count.

    Example:
        >>> labels, radii = certified_prediction(
        ...     [[90, 10, 0], [50, 50, 0]], [[900, 95, 5], [500, 495, 5]], 1, 0.5, 0.001
        ... )
        >>> labels.tolist(), [round(r, 4) for r in radii.flatten().tolist()[:1]]
        ([[0], [-1]], [0.5557])
    """
    labels, separated = select_top_k(selection_counts, k)
    num_classes = to_numpy(selection_counts).shape[1]
    (k,) = check_top_k(k, num_classes)
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    counts_np = to_numpy(counts)
    if counts_np.shape != (labels.shape[0], num_classes):
        raise ValueError(
            f"counts must have the selection counts' shape {(labels.shape[0], num_classes)}, "
            f"got {tuple(counts_np.shape)}"
        )
    radii = torch.full(labels.shape, float("nan"), dtype=torch.float64)  # (B, k)
    rows = separated.numpy()
    if rows.any():
        fresh = check_counts(counts_np[rows])  # (S, c)
        chosen = labels.numpy()[rows]  # (S, k)
        level = bound_level(alpha, num_classes, k)
        n = fresh.sum(axis=1, keepdims=True)  # (S, 1)
        lower = _unique_apply(
            lambda m, t: _lower(m, t, level), np.take_along_axis(fresh, chosen, 1), n
        )  # (S, k)
        upper = _unique_apply(lambda m, t: _upper(m, t, level), fresh, n)  # (S, c)
        # one row per (example, chosen label): its lower bound against every upper bound
        radius = radius_from_bounds(
            lower.reshape(-1), np.repeat(upper, k, axis=0), chosen.reshape(-1), k, sigma
        )  # (S * k, 1)
        radii[torch.from_numpy(rows)] = radius.view(-1, k)
    answered = ~radii.isnan().any(dim=1)  # (B,)
    labels = torch.where(answered[:, None], labels, torch.full_like(labels, -1))
    return labels, radii.where(answered[:, None], torch.full_like(radii, float("nan")))
