"""Sequential top-k certification: the certificates of CERTIFY from fewer samples.

An input is sampled in growing rounds. After each round (a *look*) every label gets a
one-sided Clopper-Pearson bound on its probability from all the samples drawn so far; the
label to certify a lower bound, every other label an upper bound, each at level
``alpha_j / c`` (SimuEM's Bonferroni over the c labels) where the levels ``alpha_j`` of the
looks of a schedule fixed in advance sum to alpha. By the union bound over the c labels and
the looks, with probability at least 1 - alpha every bound of every look holds at once; so do
the intersections of the bounds over the looks so far, and Theorem 1's radius computed from
them holds for every k at once. Which look an input stops at is then free to depend on the
counts. The argument, the schedule and the stopping rule are written in ``docs/sequential.md``.

An input stops as soon as every k is *decided* at every target radius: certified, or out of
reach. A target is out of reach when even optimistic probabilities (the label at its upper
Clopper-Pearson bound at level ``futility``, 0.02 at each look, the others at their lower
bounds) would not certify it from ``n_max`` samples at the last look's level. That rule only
decides when to stop; every reported radius still comes from the valid bounds, so it cannot
make a certificate wrong, only miss one that more samples would have given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from certify.math.bounds import _lower, _unique_apply, _upper
from certify.math.radius import _radius_from_sorted_uppers, _top_uppers_excluding
from certify.math.validation import (
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


def look_schedule(
    n_max: int, first: int = DEFAULT_FIRST, growth: float = DEFAULT_GROWTH, multiple: int = 1
) -> tuple[int, ...]:
    """Cumulative sample sizes of the looks: ``first``, ``first * growth``, ... up to ``n_max``.

    Each look is rounded up to a multiple of ``multiple`` (the sampler's noise chunk, so that
    rounds start on chunk boundaries); the last look is ``n_max``. The schedule depends on its
    arguments only, never on the counts, as the union bound over the looks requires.

    Example:
        >>> look_schedule(100_000, growth=2.0)
        (1000, 2000, 4000, 8000, 16000, 32000, 64000, 100000)
        >>> look_schedule(10_000, first=1000, growth=3.0, multiple=128)
        (1024, 3072, 9088, 10000)
    """
    n_max = check_int(n_max, "n_max")
    first = check_int(first, "first")
    multiple = check_int(multiple, "multiple")
    if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1):
        raise ValueError(f"growth must be a number > 1, got {growth!r}")
    looks: list[int] = []
    size = float(first)
    while not looks or looks[-1] < n_max:
        n = min(n_max, -(-math.ceil(size) // multiple) * multiple)
        if not looks or n > looks[-1]:
            looks.append(n)
        size *= growth
    return tuple(looks)


def check_schedule(schedule: Sequence[int], n_max: int) -> tuple[int, ...]:
    """Strictly increasing positive integers ending at ``n_max``."""
    looks = tuple(schedule)
    for n in looks:
        check_int(n, "every look of the schedule")
    if (
        not looks
        or any(b <= a for a, b in zip(looks[:-1], looks[1:], strict=True))
        or (looks[-1] != n_max)
    ):
        raise ValueError(
            f"schedule must be strictly increasing sample sizes ending at n_max = {n_max}, "
            f"got {list(looks)}"
        )
    return tuple(int(n) for n in looks)


def spend(alpha: float, looks: int, weights: Sequence[float] | None = None) -> np.ndarray:
    """The levels ``alpha_j`` of the looks: ``alpha`` split in proportion to ``weights``
    (positive). By default the last look gets ``DEFAULT_LAST_SHARE`` (3/4) of alpha and the
    others share the rest evenly: the last look decides the inputs closest to a target, where a
    smaller level would cost certified accuracy, while an early look's level enters its bounds
    only through a logarithm. The levels sum to at most ``alpha``.

    Example:
        >>> spend(0.001, 6).tolist()
        [5e-05, 5e-05, 5e-05, 5e-05, 5e-05, 0.00075]
        >>> spend(0.001, 4, [1, 1, 1, 1]).tolist()
        [0.00025, 0.00025, 0.00025, 0.00025]
    """
    alpha = check_alpha(alpha)
    looks = check_int(looks, "looks")
    rest = (1 - DEFAULT_LAST_SHARE) / DEFAULT_LAST_SHARE * np.ones(looks - 1) / max(1, looks - 1)
    default = np.r_[rest, 1.0]
    w = default if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (looks,) or not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError(
            f"spending must be {looks} positive weights (one per look), got "
            f"{[float(v) for v in np.ravel(w)]}"
        )
    levels = alpha * w / w.sum()
    return levels * min(1.0, alpha / levels.sum())  # rounding never spends more than alpha


@dataclass(frozen=True)
class SequentialCertificate:
    """What ``certify_sequential`` returns.

    Attributes:
        radius: float64 ``(B, K)``: the largest target radius at which the label is certified
            for each k, NaN where none is.
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
        num_classes: c, to check ``labels`` and ``top_k`` before drawing (else after the
            first round).
        schedule: cumulative sample sizes of the looks, ending at ``n_max``; default
            ``look_schedule(n_max)`` (1,000 samples, then 25 % more at each look).
        spending: relative weights of the looks' levels (default: ``spend``'s, 3/4 of
            alpha at the last look).
        futility: level, at each look, of the optimistic bounds that stop pursuing a target
            out of reach; ``None`` pursues every target until certified or ``n_max``.

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
    labels = np.asarray(to_numpy(labels))
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    batch = labels.shape[0]
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", low=2)
        labels = check_labels(labels, batch, num_classes)
        top_k = check_top_k(top_k, num_classes)
    else:
        top_k = check_top_k(top_k, None)
    sigma = check_sigma(sigma)
    alpha = check_alpha(alpha)
    targets = check_radii(radii)
    n_max = check_int(n_max, "n_max")
    looks = look_schedule(n_max) if schedule is None else check_schedule(schedule, n_max)
    levels = spend(alpha, len(looks), spending)
    if futility is not None:
        futility = check_alpha(futility, name="futility")
    return _certify_rounds(draw, labels, top_k, sigma, targets, looks, levels, futility)


def _certify_rounds(draw, labels, top_k, sigma, targets, looks, levels, futility):
    """The rounds, with the looks' levels given (the tests also run unsound levels here)."""
    labels = np.asarray(labels)
    batch, targets = len(labels), np.asarray(targets, dtype=np.float64)
    active = np.ones(batch, dtype=bool)
    samples = np.zeros(batch, dtype=np.int64)
    certified = np.zeros((batch, len(top_k)), dtype=np.int64)  # targets certified, per k
    counts = p_lower = upper = None
    drawn = 0
    for j, n in enumerate(looks):
        new = _checked_draw(draw, n - drawn, active, batch, counts)
        if counts is None:  # the first round tells c
            c = new.shape[1]
            labels = check_labels(labels, batch, c)
            top_k = check_top_k(top_k, c)
            counts = np.zeros_like(new)
            p_lower, upper = np.zeros(batch), np.ones((batch, c))
        counts += new
        samples[active] = n
        rows = np.flatnonzero(active)
        own = counts[rows, labels[rows]]
        level = levels[j] / counts.shape[1]
        # Bounds from all samples so far, intersected with those of the earlier looks.
        p_lower[rows] = np.maximum(p_lower[rows], _unique_apply(_at(_lower, level), own, n))
        upper[rows] = np.minimum(upper[rows], _unique_apply(_at(_upper, level), counts[rows], n))
        tops = _top_uppers_excluding(upper[rows], labels[rows], max(top_k))  # (b, K) descending
        radius = _radius_from_sorted_uppers(p_lower[rows], tops, top_k, sigma)  # (b, K)
        certified[rows] = _targets_within(radius, targets)
        if j == len(looks) - 1:
            break
        reachable = len(targets)
        if futility is not None:
            best = _optimistic_radius(
                counts[rows], labels[rows], n, looks[-1], levels[-1], futility, top_k, sigma
            )  # (b, K)
            reachable = _targets_within(best, targets)
        decided = (certified[rows] >= reachable).all(axis=1)  # (b,)
        active[rows[decided]] = False
        if not active.any():
            break
        drawn = n
    radius = np.full(certified.shape, np.nan)
    some = certified > 0
    radius[some] = targets[certified[some] - 1]
    return SequentialCertificate(
        radius=torch.from_numpy(radius),
        samples=torch.from_numpy(samples),
        counts=torch.from_numpy(counts),
        schedule=tuple(looks),
        levels=np.asarray(levels, dtype=np.float64),
    )


def _at(bound, level: float):
    return lambda k, m: bound(k, m, level)


def _targets_within(radius: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """How many (ascending) targets are at most each radius (NaN: none)."""
    return (np.nan_to_num(radius, nan=-1.0)[..., None] >= targets).sum(axis=-1)


def _optimistic_radius(counts, labels, n, n_max, last_level, futility, top_k, sigma):
    """Radius that ``n_max`` samples would certify at the last look's level if the label's
    frequency were its upper Clopper-Pearson bound at level ``futility`` and every other
    label's frequency its lower bound (``(b, K)``, NaN: not even at radius 0)."""
    batch, c = counts.shape
    rows = np.arange(batch)
    hopeful = _unique_apply(_at(_lower, futility), counts, n)  # (b, c)
    own = counts[rows, labels]
    hopeful[rows, labels] = _unique_apply(_at(_upper, futility), own, n)
    projected = hopeful * n_max  # (b, c) expected counts under the optimistic frequencies
    projected[rows, labels] = np.ceil(projected[rows, labels])
    projected = np.minimum(np.floor(projected), n_max).astype(np.int64)
    level = last_level / c
    p_lower = _unique_apply(_at(_lower, level), projected[rows, labels], n_max)
    upper = _unique_apply(_at(_upper, level), projected, n_max)
    tops = _top_uppers_excluding(upper, labels, max(top_k))
    return _radius_from_sorted_uppers(p_lower, tops, top_k, sigma)


def _checked_draw(draw, m, active, batch, counts) -> np.ndarray:
    """``draw(m, active)`` as an int64 array, refused unless it is a valid round of counts."""
    new = to_numpy(draw(m, torch.from_numpy(active.copy())))
    if new.ndim != 2 or new.shape[0] != batch or new.shape[1] < 2:
        raise ValueError(f"draw must return ({batch}, c) counts, got shape {tuple(new.shape)}")
    if counts is not None and new.shape != counts.shape:
        raise ValueError(f"draw returned shape {tuple(new.shape)}, earlier {counts.shape}")
    if new.dtype == bool or not np.issubdtype(new.dtype, np.integer):
        raise ValueError(f"draw must return integer counts, got dtype {new.dtype}")
    new = new.astype(np.int64)
    sums = new.sum(axis=1)
    bad = np.flatnonzero((new < 0).any(axis=1) | (sums != np.where(active, m, 0)))
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"draw({m}, active) gave row {b} ({'active' if active[b] else 'inactive'}) counts "
            f"summing to {int(sums[b])}; expected {m if active[b] else 0}, none negative"
        )
    return new
