"""Argument checks shared by the certification code: one ``ValueError`` naming the bad value."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch


def to_numpy(x) -> np.ndarray:
    """A NumPy view of an array-like or a torch tensor on any device."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


#: Reduced precisions of the sampler's forward pass by name (``None``: the model's own).
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(autocast: str | None) -> torch.dtype | None:
    """The dtype named by ``autocast`` (``"bf16"``, ``"fp16"`` or ``None``)."""
    if not isinstance(autocast, (str, type(None))) or autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be 'bf16' or 'fp16', got {autocast!r}")
    return AUTOCAST_DTYPES[autocast]


def check_compile(device: torch.device | str) -> None:
    """Raise ``ValueError`` (one line) if ``torch.compile`` cannot build code for ``device``.

    Compiles a tiny function with inductor's caches off, so that a missing C++ compiler (CPU)
    or Triton (GPU) shows up before a run writes anything, not at its first batch.
    """
    import torch._inductor.config as inductor_config

    device = torch.device(device)

    def probe(t: torch.Tensor) -> torch.Tensor:
        return t * 2 + 1

    # Without caches inductor builds in a temporary directory; on failure it logs a warning
    # that names the directory it keeps. Our one-line error says what matters.
    quiet = logging.getLogger("torch._inductor.utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with inductor_config.patch(force_disable_caches=True):
            torch.compile(probe, dynamic=False)(torch.ones(8, device=device))
    except Exception as err:  # BackendCompilerFailed, InvalidCxxCompiler, missing Triton...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        message = f"compile is on but torch.compile fails on {device.type}: {reason}"
        raise ValueError(message) from None
    finally:
        quiet.setLevel(level)


#: The smallest failure probability accepted: SciPy's Beta quantiles (``betaincinv``) go wrong
#: far below it (at 1e-281 a lower bound came out 0.43 for a true 0.41, a radius 23 % too
#: large), and no certificate needs more than 1 - 1e-100.
MIN_ALPHA = 1e-100


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if not isinstance(alpha, (int, float, np.floating)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {alpha!r}")
    if float(alpha) < MIN_ALPHA:
        raise ValueError(
            f"{name} must be at least {MIN_ALPHA:g} (Beta quantiles are not reliable below),"
            f" got {alpha!r}"
        )
    return float(alpha)


def check_sigma(sigma: float) -> float:
    ok = isinstance(sigma, (int, float, np.floating)) and math.isfinite(sigma) and sigma > 0
    if not ok:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def check_counts(counts) -> np.ndarray:
    """Counts as an int64 ``(B, c)`` array with c >= 2, no negatives and positive row sums."""
    arr = to_numpy(counts)
    if arr.ndim != 2:
        raise ValueError(f"counts must have shape (B, c), got shape {tuple(arr.shape)}")
    if arr.shape[1] < 2:
        raise ValueError(f"counts need at least 2 classes, got c = {arr.shape[1]}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        row = int(np.argwhere(arr < 0)[0, 0])
        raise ValueError(f"counts must be >= 0, row {row} has {arr[row].min()}")
    empty = np.flatnonzero(arr.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"counts of row {int(empty[0])} sum to 0: no samples to bound")
    return arr


def check_labels(labels, batch: int, num_classes: int) -> np.ndarray:
    arr = to_numpy(labels)
    if arr.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(arr.shape)}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        raise ValueError(
            f"label {int(arr[bad[0]])} of row {int(bad[0])} is outside 0..{num_classes - 1}"
            " (labels must be class indices)"
        )
    return arr.astype(np.int64, copy=False)


def check_top_k(top_k: int | Sequence[int], num_classes: int) -> tuple[int, ...]:
    ks = (top_k,) if isinstance(top_k, (int, np.integer)) else tuple(top_k)
    if not ks:
        raise ValueError("top_k must name at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValueError(f"k must be an integer, got {k!r}")
        if not 1 <= k < num_classes:
            raise ValueError(f"k must satisfy 1 <= k < c = {num_classes}, got k = {k}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"the k values must be distinct, got {[int(k) for k in ks]}")
    return tuple(int(k) for k in ks)


def check_seed(seed) -> int | None:
    """``None`` or an integer in 0 .. 2**64 - 1 (Python or NumPy; not a bool or a float).

    The noise streams use the seed's 64 bits: a wider or negative seed would silently share
    its streams with another one (2**64 with 0, -1 with 2**64 - 1).
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must lie in 0 .. 2**64 - 1, got {seed!r}")
    return None if seed is None else int(seed)


def check_bounds(bounds: str) -> str:
    if bounds not in ("simuem", "binocp"):
        raise ValueError(f"bounds must be 'simuem' or 'binocp', got {bounds!r}")
    return bounds
