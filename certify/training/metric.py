"""Certified top-k accuracy at chosen radii, as a torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from certify.math.validation import check_top_k

# Radii are summed in fixed point (units of 2^-32) so that the sum, and with it the average
# certified radius, is exactly the same whatever the order of summation: on one process or
# split across many, in any batch composition. The resolution (2.3e-10) is far below any
# radius that matters; a single radius saturates at 2^30.
_FIXED_POINT = 2.0**32
_MAX_RADIUS = 2.0**30


def radius_key(k: int, r: float) -> str:
    """The log key of certified top-k accuracy at radius r, e.g. ``certified_top3@0.5``."""
    return f"certified_top{k}@{r:g}"


def _certified_topk_accuracy_update(
    radii: Tensor, thresholds: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-batch sums: examples certified at each radius, fixed-point radius sum, count.

    Args:
        radii: ``(B, K)`` certified radii of the true labels; NaN = not certified.
        thresholds: ``(R,)`` radii at which accuracy is reported.

    Returns:
        ``(certified (K, R) int64, radius_sum (K,) int64 fixed point, total () int64)``.
    """
    radii = radii.to(torch.float64)
    certified = radii[:, :, None] >= thresholds.to(torch.float64)[None, None, :]  # (B, K, R)
    clipped = torch.nan_to_num(radii, nan=0.0).clamp(0.0, _MAX_RADIUS)  # (B, K)
    fixed = torch.round(clipped * _FIXED_POINT).to(torch.int64)  # (B, K)
    total = torch.tensor(radii.shape[0], dtype=torch.int64, device=radii.device)
    return certified.sum(dim=0), fixed.sum(dim=0), total


def _certified_topk_accuracy_compute(
    certified: Tensor, radius_sum: Tensor, total: Tensor
) -> tuple[Tensor, Tensor]:
    """``(accuracy (K, R), acr (K,))`` in float64; NaN when no example was seen."""
    denominator = total.to(torch.float64)
    if denominator == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=certified.device)
        return nan.expand(certified.shape).clone(), nan.expand(radius_sum.shape).clone()
    accuracy = certified.to(torch.float64) / denominator
    acr = radius_sum.to(torch.float64) / _FIXED_POINT / denominator
    return accuracy, acr


class CertifiedTopKAccuracy(Metric):
    """Certified top-k accuracy at chosen l2 radii, and the average certified radius (ACR).

    Certified top-k accuracy at radius r is the fraction of examples whose true label is
    certified to stay in the top-k within radius r (an abstention fails at every r, r = 0
    included); the ACR averages the certified radius with 0 for abstentions. Only integer sum
    states are kept, so the result under DDP is exactly the single-process result.

    Args:
        top_k: the k of each column of the radii passed to ``update``.
        radii: the radii at which accuracy is reported.

    Example:
        >>> import torch
        >>> metric = CertifiedTopKAccuracy(top_k=(1, 3), radii=(0.0, 0.5))
        >>> metric.update(torch.tensor([[0.7, 0.9], [float("nan"), 0.2], [0.3, 0.6]]))
        >>> {key: round(value.item(), 4) for key, value in metric.compute().items()}
        {'certified_top1@0': 0.6667, 'certified_top1@0.5': 0.3333, 'certified_top3@0': 1.0, \
'certified_top3@0.5': 0.6667, 'acr_top1': 0.3333, 'acr_top3': 0.5667}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    certified: Tensor
    radius_sum: Tensor
    total: Tensor

    def __init__(self, top_k: Sequence[int], radii: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        top_k, radii = tuple(top_k), tuple(float(r) for r in radii)
        top_k = check_top_k(top_k, None, name="top_k")
        if not radii or any(not r >= 0 for r in radii):
            raise ValueError(f"radii must be a non-empty sequence of numbers >= 0, got {radii!r}")
        self.top_k, self.radii = top_k, radii
        self.register_buffer("thresholds", torch.tensor(radii, dtype=torch.float64))
        shape = (len(top_k), len(radii))
        zeros = torch.zeros(shape, dtype=torch.int64)
        self.add_state("certified", default=zeros, dist_reduce_fx="sum")
        self.add_state("radius_sum", torch.zeros(len(top_k), dtype=torch.int64), "sum")
        self.add_state("total", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, radii: Tensor) -> None:
        """Add a batch of radii ``(B, len(top_k))`` from ``certified_radius`` (NaN = abstain)."""
        if radii.ndim != 2 or radii.shape[1] != len(self.top_k):
            raise ValueError(
                f"radii must have shape (B, {len(self.top_k)}), got {tuple(radii.shape)}"
            )
        certified, radius_sum, total = _certified_topk_accuracy_update(
            radii.to(self.certified.device), self.thresholds
        )
        self.certified += certified
        self.radius_sum += radius_sum
        self.total += total

    def compute_table(self) -> tuple[Tensor, Tensor]:
        """``(accuracy (len(top_k), len(radii)), acr (len(top_k),))`` as float64 tensors."""
        return _certified_topk_accuracy_compute(self.certified, self.radius_sum, self.total)

    def compute(self) -> dict[str, Tensor]:
        """Accuracy and ACR keyed ``certified_top{k}@{r:g}`` and ``acr_top{k}``."""
        accuracy, acr = self.compute_table()
        out = {
            radius_key(k, r): accuracy[i, j]
            for i, k in enumerate(self.top_k)
            for j, r in enumerate(self.radii)
        }
        out.update({f"acr_top{k}": acr[i] for i, k in enumerate(self.top_k)})
        return out

    def plot(self, val: dict[str, Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Certified accuracy against radius, one curve per k (the paper's figure 1 style).

        Args:
            val: a result of ``compute()``; computed now when omitted.
            ax: a matplotlib axis to draw into; a new figure when omitted.

        Returns:
            ``(figure, axis)``.
        """
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        val = self.compute() if val is None else val
        fig, ax = plt.subplots(figsize=(5, 3.5)) if ax is None else (ax.get_figure(), ax)
        for k in self.top_k:
            ys = [float(val[radius_key(k, r)]) for r in self.radii]
            ax.plot(self.radii, ys, marker="o", label=f"top-{k}")
        ax.set(xlabel="radius (l2)", ylabel="certified accuracy", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
        return fig, ax
