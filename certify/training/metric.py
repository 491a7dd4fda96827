"""Certified top-k accuracy at chosen radii, as a torchmetrics ``Metric``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from certify.math.validation import check_top_k

# Radii are summed exactly, so that the sum, and with it the average certified radius, is the
# same whatever the order of summation: on one process or split across many, in any batch
# composition. Every finite float64 is an integer multiple of 2^-1074 (the smallest subnormal)
# below 2^1024, so a radius is an integer of at most 2098 bits in units of 2^-1074; the sum of
# the finite radii is kept as such an integer, in 32-bit limbs stored in int64 (a
# superaccumulator over float64's whole range: 0, subnormals and 1e300 alike). Infinite radii
# (nothing bounds the label) are counted apart; one makes the ACR infinite.
_UNIT_EXPONENT = 1074  # a radius r is r * 2^1074 units
_LIMB_BITS = 32
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_LIMBS = 68  # 68 * 32 = 2176 bits: 2098 for one radius and 78 for the number of radii


def radius_key(k: int, r: float) -> str:
    """The log key of certified top-k accuracy at radius r, e.g. ``certified_top3@0.5``."""
    return f"certified_top{k}@{r:g}"


def _radius_limbs(radii: Tensor) -> Tensor:
    """Exact sums of finite radii ``(B, K)`` >= 0 as ``(K, _LIMBS)`` int64 limbs (not carried).

    A radius m * 2^e (m an integer below 2^53) is m shifted left by e + 1074 bits: three
    pieces of at most 32 bits in limbs q, q + 1 and q + 2 (q = shift // 32). A batch adds
    less than ``B * 2^32`` to any limb.
    """
    mantissa, exponent = torch.frexp(radii)  # radii = mantissa * 2^exponent, 0.5 <= mantissa < 1
    m = (mantissa * 2.0**53).to(torch.int64)  # (B, K) exact: at most 53 bits
    shift = exponent.to(torch.int64) - 53 + _UNIT_EXPONENT  # (B, K) in -52 .. 2045
    m = torch.where(shift < 0, m >> (-shift).clamp(min=0), m)  # subnormals: exact, low bits 0
    shift = shift.clamp(min=0)
    q, r = shift // _LIMB_BITS, shift % _LIMB_BITS  # (B, K)
    pieces = torch.stack(
        [
            (m & ((1 << (_LIMB_BITS - r)) - 1)) << r,
            (m >> (_LIMB_BITS - r)) & _LIMB_MASK,
            (m >> _LIMB_BITS) >> (_LIMB_BITS - r),
        ],
        dim=-1,
    )  # (B, K, 3)
    where = torch.stack([q, q + 1, q + 2], dim=-1)  # (B, K, 3)
    width = radii.shape[1]
    limbs = torch.zeros(width, _LIMBS, dtype=torch.int64, device=radii.device)
    index = where.permute(1, 0, 2).reshape(width, -1)  # (K, B * 3)
    return limbs.scatter_add_(1, index, pieces.permute(1, 0, 2).reshape(width, -1))


def _carry(limbs: Tensor) -> Tensor:
    """The same integers with every limb but the last below 2^32 (so sums cannot overflow)."""
    limbs = limbs.clone()
    while True:
        carry = limbs[..., :-1] >> _LIMB_BITS
        if not carry.any():
            return limbs
        limbs[..., :-1] &= _LIMB_MASK
        limbs[..., 1:] += carry


def _limbs_to_int(limbs: Tensor) -> list[int]:
    """Each row of limbs as one Python integer (any limb values, carried or not)."""
    return [
        sum(int(v) << (_LIMB_BITS * j) for j, v in enumerate(row) if v) for row in limbs.tolist()
    ]


def _certified_topk_accuracy_update(
    radii: Tensor, thresholds: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-batch sums: examples certified at each radius, exact radius sum, infinite radii, count.

    Args:
        radii: ``(B, K)`` certified radii of the true labels, >= 0; NaN = not certified,
            ``inf`` = certified at every radius.
        thresholds: ``(R,)`` radii at which accuracy is reported.

    Returns:
        ``(certified (K, R) int64, radius_limbs (K, L) int64, infinite (K,) int64,
        total () int64)``.
    """
    radii = radii.to(torch.float64)
    certified = radii[:, :, None] >= thresholds.to(torch.float64)[None, None, :]  # (B, K, R)
    infinite = torch.isinf(radii)  # (B, K)
    finite = torch.where(torch.isnan(radii) | infinite, 0.0, radii)  # (B, K)
    total = torch.tensor(radii.shape[0], dtype=torch.int64, device=radii.device)
    return certified.sum(dim=0), _radius_limbs(finite), infinite.sum(dim=0), total


def _certified_topk_accuracy_compute(
    certified: Tensor, radius_limbs: Tensor, infinite: Tensor, total: Tensor
) -> tuple[Tensor, Tensor]:
    """``(accuracy (K, R), acr (K,))`` in float64; NaN when no example was seen.

    The ACR is the exact sum divided by the count, rounded once (Python's integer division
    rounds correctly); ``inf`` when some radius is infinite.
    """
    count = int(total)
    if count == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=certified.device)
        return nan.expand(certified.shape).clone(), nan.expand(infinite.shape).clone()
    accuracy = certified.to(torch.float64) / count
    means = [
        float("inf") if inf else value / (count << _UNIT_EXPONENT)
        for value, inf in zip(_limbs_to_int(radius_limbs), infinite.tolist(), strict=True)
    ]
    return accuracy, torch.tensor(means, dtype=torch.float64, device=certified.device)


class CertifiedTopKAccuracy(Metric):
    """Certified top-k accuracy at chosen l2 radii, and the average certified radius (ACR).

    Certified top-k accuracy at radius r is the fraction of examples whose true label is
    certified to stay in the top-k within radius r (an abstention fails at every r, r = 0
    included); the ACR averages the certified radius with 0 for abstentions. An infinite
    radius (nothing bounds the label) is certified at every radius and makes the ACR infinite.
    Only integer sum states are kept, the radii summed exactly over float64's whole range, so
    the result under DDP is exactly the single-process result, in any order.

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
    radius_limbs: Tensor
    infinite: Tensor
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
        limbs = torch.zeros(len(top_k), _LIMBS, dtype=torch.int64)
        self.add_state("radius_limbs", default=limbs, dist_reduce_fx="sum")
        self.add_state("infinite", torch.zeros(len(top_k), dtype=torch.int64), "sum")
        self.add_state("total", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, radii: Tensor) -> None:
        """Add a batch of radii ``(B, len(top_k))`` from ``certified_radius`` (NaN = abstain)."""
        if radii.ndim != 2 or radii.shape[1] != len(self.top_k):
            raise ValueError(
                f"radii must have shape (B, {len(self.top_k)}), got {tuple(radii.shape)}"
            )
        if (radii < 0).any():
            bad = radii[radii < 0][0].item()
            raise ValueError(f"radii must be >= 0 (NaN for an abstention), got {bad}")
        certified, radius_limbs, infinite, total = _certified_topk_accuracy_update(
            radii.to(self.certified.device), self.thresholds
        )
        self.certified += certified
        self.radius_limbs = _carry(self.radius_limbs + radius_limbs)
        self.infinite += infinite
        self.total += total

    def compute_table(self) -> tuple[Tensor, Tensor]:
        """``(accuracy (len(top_k), len(radii)), acr (len(top_k),))`` as float64 tensors."""
        return _certified_topk_accuracy_compute(
            self.certified, self.radius_limbs, self.infinite, self.total
        )

    def compute(self) -> dict[str, Tensor]:
        """Accuracy and ACR keyed ``certified_top{k}@{r:g}`` and ``acr_top{k}``."""
        return self.keyed(*self.compute_table())

    def keyed(self, accuracy: Tensor, acr: Tensor) -> dict[str, Tensor]:
        """``compute_table()``'s ``(accuracy, acr)`` keyed as ``compute()`` returns them."""
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
