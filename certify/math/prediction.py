"""PREDICT of the smoothed top-k classifier from Monte Carlo counts: ``top_k_set`` from one
sample, ``certified_prediction`` with a radius per label from a second one
(``docs/topk-certification.md``, "PREDICT with a certified radius per label") and
``sequential_prediction``, the second sample drawn in rounds (``docs/sequential.md``,
"Sequential PREDICT")."""

from __future__ import annotations

import numpy as np
import torch

from certify.math.bounds import _lower, _simuem, _upper
from certify.math.radius import _radius
from certify.math.sequential import certify_sequential
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


def _ranked(selection: np.ndarray, k: int) -> torch.Tensor:
    """The k labels with the most selection counts ``(B, k)``, ties by label: a fixed function
    of the selection sample."""
    return torch.from_numpy(selection).sort(dim=1, descending=True, stable=True).indices[:, :k]


def bound_level(alpha: float, num_classes: int, k: int) -> float:
    """The level of each one-sided bound of ``certified_prediction``: alpha over the number of
    bounds used, ``c`` for k = 1 and ``c + k`` for k >= 2 (the set's labels need upper bounds)."""
    return alpha / (num_classes + (k if k > 1 else 0))


def certified_prediction(
    selection_counts, counts, k: int, sigma: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k labels the selection sample ranks first, each with its certified top-k radius.

    With probability at least ``1 - alpha`` over the fresh sample, whatever the selection
    sample, every label with a radius R (not NaN) is in the smoothed classifier's top k at every
    perturbation of l2 norm below R, all such labels at once. Nothing is claimed of a label with
    a NaN radius (the selection's guess), nor of the order; a row of -1 and NaN (abstain) has
    no label certified.

    Args:
        selection_counts: ``(B, c)`` counts of the selection sample (n0 samples per row).
        counts: ``(B, c)`` counts of the independent fresh sample (n samples per row).
        k: the size of the label set, ``1 <= k < c``.
        sigma: the noise level of both samples.
        alpha: the probability that some stated radius of a row is wrong.

    Returns:
        ``(labels (B, k) int64, radii (B, k) float64)``, labels by decreasing selection count
        (a tie ordered by label), NaN where a label is not certified.

    Example:
        >>> selection, fresh = [[90, 8, 2, 0]], [[1800, 180, 15, 5]]
        >>> labels, radii = certified_prediction(selection, fresh, 3, 0.25, 0.001)
        >>> labels.tolist(), [round(r, 4) for r in radii[0].tolist()]
        ([[0, 1, 2]], [0.4654, 0.1072, nan])
    """
    selection, fresh = check_counts(selection_counts), check_counts(counts)  # (B, c), (B, c)
    num_classes = selection.shape[1]
    (k,) = check_top_k(k, num_classes)
    sigma, alpha = check_sigma(sigma), check_alpha(alpha)
    if fresh.shape != selection.shape:
        raise UsageError(
            f"counts must have the selection counts' shape {selection.shape}, got {fresh.shape}"
        )
    labels = _ranked(selection, k)  # (B, k)
    chosen = labels.numpy()
    level = bound_level(alpha, num_classes, k)
    n = fresh.sum(axis=1, keepdims=True)  # (B, 1)
    lower = _lower(np.take_along_axis(fresh, chosen, 1), n, level)  # (B, k)
    upper = _upper(fresh, n, level)  # (B, c)
    # one row per (example, chosen label): its lower bound against every other upper bound
    radius = _radius(
        lower.reshape(-1), np.repeat(upper, k, axis=0), chosen.reshape(-1), (k,), sigma
    )  # (B * k, 1)
    radii = torch.from_numpy(radius).view(-1, k)  # (B, k)
    answered = ~radii.isnan().all(dim=1)  # (B,)
    return torch.where(answered[:, None], labels, torch.full_like(labels, -1)), radii


def sequential_prediction(
    selection_counts, draw, k: int, sigma: float, alpha: float, radii, n_max: int, **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``certified_prediction`` with the fresh sample drawn in rounds: the k labels the
    selection sample ranks first, each with the largest target radius certified.

    Each chosen label is one row of ``certify_sequential`` (top-k, at ``radii``); the rows of
    an input read the same fresh samples, drawn while any of them is undecided. The rows' bounds
    are those of ``bound_level``: alpha over ``c + k`` bounds per look for k >= 2 (the chosen
    labels' lower bounds and every label's upper bound), over ``c`` for k = 1. With probability
    at least ``1 - alpha`` over the fresh samples, whatever the selection sample, every label
    with a radius R (not NaN) is in the smoothed top k at every perturbation of l2 norm below
    R, all such labels of an input at once.

    Args:
        selection_counts: ``(B, c)`` counts of the selection sample.
        draw: ``draw(m, active)`` returns int64 ``(B, c)`` counts of the next ``m`` fresh
            samples of every input where the bool ``(B,)`` tensor ``active`` is true (zeros
            elsewhere), as for ``certify_sequential``.
        k: the size of the label set, ``1 <= k < c``.
        sigma: the noise level of the samples.
        alpha: the probability that some stated radius of an input is wrong.
        radii: the target radii; a stated radius is one of them.
        n_max: the most fresh samples drawn for an input.
        options: ``certify_sequential``'s ``schedule``, ``spending``, ``futility``, ``budget``.

    Returns:
        ``(labels (B, k) int64, radius (B, k) float64, samples (B,) int64, counts (B, c)
        int64)``: labels by decreasing selection count (a tie by label), -1s where no label is
        certified (abstain); NaN where a label is not; the fresh samples drawn and their counts.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = np.array([0.97, 0.025, 0.004, 0.001])
        >>> def draw(m, active):
        ...     counts = rng.multinomial(m, p, size=len(active))
        ...     return torch.from_numpy(counts * active.numpy()[:, None])
        >>> labels, radius, samples, _ = sequential_prediction(
        ...     [[90, 9, 1, 0]], draw, 2, 0.25, 0.001, (0, 0.25, 0.5), 100_000)
        >>> labels.tolist(), radius.tolist(), samples.tolist()
        ([[0, 1]], [[0.5, 0.0]], [1954])
    """
    selection = check_counts(selection_counts)  # (B, c)
    batch, num_classes = selection.shape
    (k,) = check_top_k(k, num_classes)
    alpha = check_alpha(alpha)
    labels = _ranked(selection, k)  # (B, k)

    def rows_draw(m: int, active: torch.Tensor) -> torch.Tensor:  # active (B * k,)
        counts = torch.as_tensor(to_numpy(draw(m, active.view(batch, k).any(dim=1))))  # (B, c)
        if counts.ndim != 2 or counts.shape[0] != batch:
            raise UsageError(f"draw must return ({batch}, c) counts, got {tuple(counts.shape)}")
        return counts.repeat_interleave(k, dim=0) * active[:, None]  # (B * k, c)

    level = bound_level(alpha, num_classes, k) * num_classes  # each bound at level / c per look
    cert = certify_sequential(
        rows_draw, labels.reshape(-1), (k,), sigma, level, radii, n_max,
        num_classes=num_classes, **options,
    )  # fmt: skip
    radius = cert.radius.view(batch, k)  # (B, k)
    samples, last = cert.samples.view(batch, k).max(dim=1)  # (B,): the input's longest row
    counts = cert.counts.view(batch, k, -1)[torch.arange(batch), last]  # (B, c)
    answered = ~radius.isnan().all(dim=1)  # (B,)
    labels = torch.where(answered[:, None], labels, torch.full_like(labels, -1))
    return labels, radius, samples, counts
