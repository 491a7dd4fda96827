"""Sequential top-k certification: the certificates of CERTIFY from fewer samples.

An input is sampled in growing rounds (looks, a schedule fixed in advance); the looks' levels
sum to alpha, so by the union bound every bound of every look holds at once and the look an
input stops at may depend on the counts. The argument and the defaults: ``docs/sequential.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from certify.math.bounds import _lower, _upper
from certify.math.mixture import mixture_bounds
from certify.math.radius import _radius
from certify.math.validation import (
    UsageError,
    check_alpha,
    check_int,
    check_labels,
    check_radii,
    check_sigma,
    check_top_k,
    to_numpy,
)

#: Samples of the first look and the factor by which the looks grow, when not given.
DEFAULT_FIRST = 1000
DEFAULT_GROWTH = 1.25
#: Level, at each look, of the optimistic bounds that decide that a target is out of reach.
DEFAULT_FUTILITY = 0.02
#: Share of alpha spent at the last look (n_max) by default; the other looks share the rest.
DEFAULT_LAST_SHARE = 0.75
#: Share of n_max within which optimistic bounds must reach a target for it to be pursued.
DEFAULT_BUDGET = 0.7


def look_schedule(
    n_max: int, first: int = DEFAULT_FIRST, growth: float = DEFAULT_GROWTH, multiple: int = 1
) -> tuple[int, ...]:
    """Cumulative sample sizes of the looks: ``first``, ``first * growth``, ... up to ``n_max``,
    each rounded up to a multiple of ``multiple`` (the sampler's noise chunk).

    Example:
        >>> look_schedule(10_000, first=1000, growth=3.0, multiple=128)
        (1024, 3072, 9088, 10000)
    """
    n_max, first = check_int(n_max, "n_max"), check_int(first, "first")
    multiple = check_int(multiple, "multiple")
    if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1):
        raise UsageError(f"growth must be a number > 1, got {growth!r}")
    looks: list[int] = []
    size = float(first)
    while not looks or looks[-1] < n_max:
        n = min(n_max, -(-math.ceil(size) // multiple) * multiple)
        if not looks or n > looks[-1]:
            looks.append(n)
        size *= growth
    return tuple(looks)


def spend(alpha: float, looks: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """The levels ``alpha_j`` of the looks, summing to at most ``alpha``: ``alpha`` split in
    proportion to positive ``weights``, by default ``DEFAULT_LAST_SHARE`` (3/4) at the last
    look and the rest evenly (``docs/sequential.md``).

    Example:
        >>> spend(0.001, 6).tolist()
        [5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 0.00075]
    """
    alpha, looks = check_alpha(alpha), check_int(looks, "looks")
    rest = (1 - DEFAULT_LAST_SHARE) / DEFAULT_LAST_SHARE * np.ones(looks - 1) / max(1, looks - 1)
    w = np.r_[rest, 1.0] if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (looks,) or not (np.isfinite(w).all() and (w > 0).all()):
        raise UsageError(
            f"spending must be {looks} positive weights (one per look), got "
            f"{[float(v) for v in np.ravel(w)]}"
        )
    levels = alpha * w / w.sum()
    return levels * min(1.0, alpha / levels.sum())  # rounding never spends more than alpha


@dataclass(frozen=True)
class SequentialCertificate:
    """What ``certify_sequential`` returns.

    Attributes:
        radius: float64 ``(B, K)``: the largest target radius certified per k (NaN: none).
        samples: int64 ``(B,)``: noisy samples drawn per input (at most ``n_max``).
        counts: int64 ``(B, c)``: their counts.
        schedule: the cumulative sample sizes of the looks.
        levels: float64 ``(J,)``: the level ``alpha_j`` of each look (they sum to alpha).
    """

    radius: torch.Tensor
    samples: torch.Tensor
    counts: torch.Tensor
    schedule: tuple[int, ...]
    levels: np.ndarray


def certify_sequential(
    draw: Callable[[int, torch.Tensor], torch.Tensor],
    labels,
    top_k: int | Sequence[int],
    sigma: float,
    alpha: float,
    radii: Sequence[float],
    n_max: int,
    *,
    num_classes: int | None = None,
    schedule: Sequence[int] | None = None,
    spending: Sequence[float] | None = None,
    futility: float | None = DEFAULT_FUTILITY,
    budget: float = DEFAULT_BUDGET,
) -> SequentialCertificate:
    """Certify ``labels`` at the target ``radii`` for every k, drawing samples in rounds.

    With probability at least 1 - alpha (per input), every radius reported for it, for every
    k, is at most the Theorem 1 radius of its true probabilities (``docs/sequential.md``).

    Args:
        draw: ``draw(m, active)`` returns int64 ``(B, c)`` counts of ``m`` fresh noisy samples
            of every input where the bool ``(B,)`` tensor ``active`` is true (zeros elsewhere).
        labels: ``(B,)`` the labels to certify.
        top_k: one k or several.
        sigma: the noise level of the samples.
        alpha: the probability that some radius reported for an input is wrong.
        radii: the target radii (finite, >= 0; a reported radius is one of them).
        n_max: the most samples drawn for an input.
        num_classes: c, to check ``labels`` and ``top_k`` before drawing.
        schedule: cumulative sample sizes of the looks, ending at ``n_max`` (default
            ``look_schedule(n_max)``).
        spending: relative weights of the looks' levels (default: ``spend``'s).
        futility: level of the optimistic bounds that stop pursuing a target out of reach;
            ``None`` pursues every target until certified or ``n_max``.
        budget: a target is out of reach when the optimistic bounds would not certify it
            with ``budget * n_max`` samples (a share in (0, 1]).

    Returns:
        A :class:`SequentialCertificate`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = np.array([0.99, 0.007, 0.003])
        >>> def draw(m, active):  # multinomial counts, zeros for the inactive rows
        ...     counts = rng.multinomial(m, p, size=len(active))
        ...     return torch.from_numpy(counts * active.numpy()[:, None])
        >>> cert = certify_sequential(draw, [0, 0], (1, 2), 0.25, 0.001, (0.25, 0.5), 100_000)
        >>> cert.radius.tolist(), cert.samples.tolist()
        ([[0.5, 0.5], [0.5, 0.5]], [3052, 1250])
    """
    labels = to_numpy(labels)
    if labels.ndim != 1:
        raise UsageError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if num_classes is not None:  # else checked against the first round's counts
        num_classes = check_int(num_classes, "num_classes", low=2)
        labels = check_labels(labels, len(labels), num_classes)
    top_k = check_top_k(top_k, num_classes)
    sigma, alpha, targets = check_sigma(sigma), check_alpha(alpha), check_radii(radii)
    n_max = check_int(n_max, "n_max")
    looks = look_schedule(n_max) if schedule is None else tuple(schedule)
    looks = tuple(check_int(n, "every look of the schedule") for n in looks)
    if not looks or looks[-1] != n_max or (np.diff(looks) <= 0).any():
        raise UsageError(
            f"schedule must be strictly increasing sample sizes ending at n_max = {n_max}, "
            f"got {list(looks)}"
        )
    levels = spend(alpha, len(looks), spending)
    if futility is not None:
        futility = check_alpha(futility, name="futility")
    if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise UsageError(f"budget must be a share of n_max in (0, 1], got {budget!r}")
    horizon = math.ceil(budget * n_max)
    return _certify_rounds(draw, labels, top_k, sigma, targets, looks, levels, futility, horizon)


def _certify_rounds(
    draw, labels, top_k, sigma, targets, looks, levels, futility, horizon=None, mixture=0.0
):
    """The rounds, with the levels given (the tests also run unsound levels here): Clopper-
    Pearson bounds at ``levels[j]`` at look j (0: none) and, after the first look, the mixture
    confidence sequence at level ``mixture`` (0: none), its prior the first look's counts.

    A target is pursued while optimistic bounds (level ``futility``) would certify it with
    ``horizon`` samples (default: the last look's), bounded as the last look bounds."""
    labels = np.asarray(labels)
    batch, targets = len(labels), np.asarray(targets, dtype=np.float64)
    active, samples = np.ones(batch, dtype=bool), np.zeros(batch, dtype=np.int64)
    certified = np.zeros((batch, len(top_k)), dtype=np.int64)  # targets certified, per k
    counts = p_lower = upper = None
    drawn = 0
    horizon = looks[-1] if horizon is None else min(horizon, looks[-1])
    for j, n in enumerate(looks):
        new = _checked_draw(draw, n - drawn, active, batch, counts)  # (B, c)
        if counts is None:  # the first round tells c
            c = new.shape[1]
            labels, top_k = check_labels(labels, batch, c), check_top_k(top_k, c)
            counts, p_lower, upper = np.zeros_like(new), np.zeros(batch), np.ones((batch, c))
        counts += new
        samples[active] = n
        rows = np.flatnonzero(active)
        level = levels[j] / counts.shape[1]
        # Bounds from all samples so far, intersected with those of the earlier looks.
        own = _lower(counts[rows, labels[rows]], n, level)  # (b,)
        p_lower[rows] = np.maximum(p_lower[rows], own)
        upper[rows] = np.minimum(upper[rows], _upper(counts[rows], n, level))  # (b, c)
        if mixture > 0 and j == 0:
            first, prior = counts.copy(), (counts + 0.5, n - counts + 0.5)  # (B, c) each
        elif mixture > 0:  # the sequence reads only the samples after the first look
            lower, up = mixture_bounds(
                (counts - first)[rows], n - looks[0], prior[0][rows], prior[1][rows],
                mixture / counts.shape[1],
            )  # fmt: skip
            p_lower[rows] = np.maximum(p_lower[rows], lower[np.arange(len(rows)), labels[rows]])
            upper[rows] = np.minimum(upper[rows], up)
        radius = _radius(p_lower[rows], upper[rows], labels[rows], top_k, sigma)  # (b, K)
        certified[rows] = _targets_within(radius, targets)
        if j == len(looks) - 1:
            break
        reachable = len(targets)
        if futility is not None:
            best = _optimistic_radius(
                counts[rows], labels[rows], n, horizon, levels[-1], futility, top_k, sigma
            )  # (b, K)
            reachable = _targets_within(best, targets)
        decided = (certified[rows] >= reachable).all(axis=1)  # (b,)
        active[rows[decided]] = False
        if not active.any():
            break
        drawn = n
    radius = np.where(certified > 0, targets[np.maximum(certified - 1, 0)], np.nan)  # (B, K)
    tensors = (torch.from_numpy(a) for a in (radius, samples, counts))
    return SequentialCertificate(*tensors, tuple(looks), np.asarray(levels, dtype=np.float64))


def _targets_within(radius: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """How many (ascending) targets are at most each radius (NaN: none)."""
    return (np.nan_to_num(radius, nan=-1.0)[..., None] >= targets).sum(axis=-1)


def _optimistic_radius(counts, labels, n, n_max, last_level, futility, top_k, sigma):
    """Radius ``(b, K)`` that ``n_max`` samples would certify at level ``last_level`` with the
    label's frequency at its upper bound at level ``futility``, the others' at their lower."""
    rows = np.arange(counts.shape[0])
    hopeful = _lower(counts, n, futility)  # (b, c)
    hopeful[rows, labels] = _upper(counts[rows, labels], n, futility)
    projected = hopeful * n_max  # (b, c) expected counts under the optimistic frequencies
    projected[rows, labels] = np.ceil(projected[rows, labels])
    projected = np.minimum(np.floor(projected), n_max).astype(np.int64)
    level = last_level / counts.shape[1]
    p_lower = _lower(projected[rows, labels], n_max, level)  # (b,)
    return _radius(p_lower, _upper(projected, n_max, level), labels, top_k, sigma)


def _checked_draw(draw, m, active, batch, counts) -> np.ndarray:
    """``draw(m, active)`` as an int64 array, refused unless it is a valid round of counts."""
    new = to_numpy(draw(m, torch.from_numpy(active.copy())))
    want = f"({batch}, c)" if counts is None else str(counts.shape)
    fits = counts is None or new.shape == counts.shape
    if new.ndim != 2 or new.shape[0] != batch or new.shape[1] < 2 or not fits:
        raise UsageError(f"draw must return {want} counts, got shape {tuple(new.shape)}")
    if new.dtype == bool or not np.issubdtype(new.dtype, np.integer):
        raise UsageError(f"draw must return integer counts, got dtype {new.dtype}")
    new = new.astype(np.int64)
    sums = new.sum(axis=1)
    bad = np.flatnonzero((new < 0).any(axis=1) | (sums != np.where(active, m, 0)))
    if bad.size:
        b = int(bad[0])
        raise UsageError(
            f"draw({m}, active) gave row {b} ({'active' if active[b] else 'inactive'}) counts "
            f"summing to {int(sums[b])}; expected {m if active[b] else 0}, none negative"
        )
    return new
