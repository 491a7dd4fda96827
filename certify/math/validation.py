"""Argument checks: one home for each rule, one ``UsageError`` naming the bad value.

Public functions check their arguments here, once; the functions they call trust them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class UsageError(ValueError):
    """A user's mistake: a one-line message naming the bad value (the CLI exits with 2)."""


def to_numpy(x) -> np.ndarray:
    """A NumPy view of an array-like or a torch tensor on any device."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


#: The smallest failure probability accepted: SciPy's Beta quantiles (``betaincinv``) go wrong
#: far below it (at 1e-281 a lower bound came out 0.43 for a true 0.41, a radius 23 % too
#: large), and no certificate needs more than 1 - 1e-100.
MIN_ALPHA = 1e-100


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise UsageError(f"{name} must lie strictly between 0 and 1, got {alpha!r}")
    if float(alpha) < MIN_ALPHA:
        raise UsageError(
            f"{name} must be at least {MIN_ALPHA:g} (Beta quantiles are not reliable below),"
            f" got {alpha!r}"
        )
    return float(alpha)


def check_sigma(sigma: float) -> float:
    ok = isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0
    if not ok:
        raise UsageError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _integers(arr: np.ndarray, what: str) -> None:
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise UsageError(f"{what} must be integers, got dtype {arr.dtype}")


def check_counts(counts) -> np.ndarray:
    """Counts as an int64 ``(B, c)`` array with c >= 2, no negatives and positive row sums."""
    arr = to_numpy(counts)
    if arr.ndim != 2:
        raise UsageError(f"counts must have shape (B, c), got shape {tuple(arr.shape)}")
    if arr.shape[1] < 2:
        raise UsageError(f"counts need at least 2 classes, got c = {arr.shape[1]}")
    _integers(arr, "counts")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        row = int(np.argwhere(arr < 0)[0, 0])
        raise UsageError(f"counts must be >= 0, row {row} has {arr[row].min()}")
    empty = np.flatnonzero(arr.sum(axis=1) == 0)
    if empty.size:
        raise UsageError(f"counts of row {int(empty[0])} sum to 0: no samples to bound")
    return arr


def check_labels(labels, batch: int, num_classes: int) -> np.ndarray:
    """Labels as an int64 ``(batch,)`` array of class indices ``0 .. num_classes - 1``."""
    arr = to_numpy(labels)
    if arr.shape != (batch,):
        raise UsageError(f"labels must have shape ({batch},), got {tuple(arr.shape)}")
    _integers(arr, "labels")
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise UsageError(
            f"label {int(arr[bad[0]])} of row {int(bad[0])} is outside 0..{num_classes - 1}"
            " (labels must be class indices)"
        )
    return arr.astype(np.int64, copy=False)


def default_top_k(num_classes: int) -> tuple[int, ...]:
    """The k values certified when none are given: 1, 3, 5, those below ``num_classes``."""
    return tuple(k for k in (1, 3, 5) if k < num_classes)


def check_int(value, name: str, low: int = 1, optional: bool = False) -> int | None:
    """``value`` as an int if it is an integer (not a bool) ``>= low``; ``None`` if optional."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_top_k(
    top_k: int | Sequence[int], num_classes: int | None, name: str = "k"
) -> tuple[int, ...]:
    """Distinct integers ``1 <= k < num_classes`` (``None``: ``k >= 1``); ``name`` the setting's."""
    ks = (top_k,) if isinstance(top_k, (int, np.integer)) else tuple(top_k)
    prefix = "" if name == "k" else f"{name}: "
    if not ks:
        raise UsageError(f"{prefix}at least one k is needed")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise UsageError(f"{prefix}k must be an integer, got {k!r}")
        if num_classes is None and k < 1:
            raise UsageError(f"{prefix}k must be >= 1, got k = {k}")
        if num_classes is not None and not 1 <= k < num_classes:
            raise UsageError(f"{prefix}k must satisfy 1 <= k < c = {num_classes}, got k = {k}")
    if len(set(ks)) != len(ks):
        raise UsageError(f"{prefix}the k values must be distinct, got {[int(k) for k in ks]}")
    return tuple(int(k) for k in ks)


def check_seed(seed) -> int | None:
    """``None`` or an integer in 0 .. 2**64 - 1, the bits the noise streams use (not a bool)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise UsageError(f"seed must be an integer or None, got {seed!r}")
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise UsageError(f"seed must lie in 0 .. 2**64 - 1, got {seed!r}")
    return None if seed is None else int(seed)


def check_bounds(bounds: str) -> str:
    if bounds not in ("simuem", "binocp"):
        raise UsageError(f"bounds must be 'simuem' or 'binocp', got {bounds!r}")
    return bounds


def check_radii(radii, name: str = "radii") -> tuple[float, ...]:
    """Target radii: at least one, each a finite number >= 0, distinct; returned ascending."""
    values = (radii,) if isinstance(radii, (int, float, np.floating)) else tuple(radii)
    if not values:
        raise UsageError(f"{name}: at least one radius is needed")
    for r in values:
        ok = isinstance(r, (int, float, np.integer, np.floating)) and not isinstance(r, bool)
        if not ok or not math.isfinite(r) or r < 0:
            raise UsageError(f"{name} must be finite numbers >= 0, got {r!r}")
    if len(set(values)) != len(values):
        raise UsageError(f"{name} must be distinct, got {[float(r) for r in values]}")
    return tuple(sorted(float(r) for r in values))
