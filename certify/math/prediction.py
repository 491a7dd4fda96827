"""PREDICT of the smoothed top-k classifier from Monte Carlo counts."""

from __future__ import annotations

import torch

from certify.math.bounds import simuem_bounds
from certify.math.validation import check_alpha, check_counts, check_top_k


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
