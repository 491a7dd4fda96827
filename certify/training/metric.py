"""Certified top-k accuracy at chosen radii, as a torchmetrics ``Metric``, and its table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from certify.math.validation import UsageError, check_top_k


def radius_key(k: int, r: float) -> str:
    """The log key of certified top-k accuracy at radius r, e.g. ``certified_top3@0.5``."""
    return f"certified_top{k}@{r:g}"


def plural(count: int, noun: str) -> str:
    """``1 example``, ``2 examples``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def exact_mean(values: list[float], count: int) -> float:
    """The mean of ``values`` (NaN counted as 0), rounded once: the ``Fraction`` sum is exact,
    so any order (any process count or batching) gives the same bits; any inf gives inf."""
    if any(math.isinf(v) for v in values):
        return math.inf
    return float(sum((Fraction(v) for v in values if not math.isnan(v)), Fraction(0)) / count)


class CertifiedTopKAccuracy(Metric):
    """Certified top-k accuracy at chosen l2 radii, and the average certified radius (ACR).

    An abstention (NaN) fails at every r and counts 0 in the ACR; an infinite radius passes
    every r and makes the ACR infinite. Counts are integer sums and the radii are gathered and
    averaged exactly, so DDP gives the single-process result bit for bit.

    Args:
        top_k: the k of each column of the radii passed to ``update``.
        radii: the radii at which accuracy is reported.

    Example:
        >>> metric = CertifiedTopKAccuracy(top_k=(1, 3), radii=(0.0, 0.5))
        >>> metric.update(torch.tensor([[0.7, 0.9], [float("nan"), 0.2], [0.3, 0.6]]))
        >>> {key: round(value.item(), 4) for key, value in metric.compute().items()}
        {'certified_top1@0': 0.6667, 'certified_top1@0.5': 0.3333, 'certified_top3@0': 1.0, \
'certified_top3@0.5': 0.6667, 'acr_top1': 0.3333, 'acr_top3': 0.5667}
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: Sequence[int], radii: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = check_top_k(tuple(top_k), None, name="top_k")
        self.radii = tuple(float(r) for r in radii)
        if not self.radii or any(not r >= 0 for r in self.radii):
            raise UsageError(f"radii must be a non-empty sequence of numbers >= 0, got {radii!r}")
        self.register_buffer("thresholds", torch.tensor(self.radii, dtype=torch.float64))
        zeros = torch.zeros(len(self.top_k), len(self.radii), dtype=torch.int64)
        self.add_state("certified", default=zeros, dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("radius_list", default=[], dist_reduce_fx="cat")  # flat (B * K,) each
        self.set_dtype(torch.float64)  # a process without examples gathers float64 too

    def update(self, radii: Tensor) -> None:
        """Add a batch of radii ``(B, len(top_k))`` from ``certified_radius`` (NaN = abstain)."""
        if radii.ndim != 2 or radii.shape[1] != len(self.top_k):
            raise UsageError(
                f"radii must have shape (B, {len(self.top_k)}), got {tuple(radii.shape)}"
            )
        if (radii < 0).any():
            bad = radii[radii < 0][0].item()
            raise UsageError(f"radii must be >= 0 (NaN for an abstention), got {bad}")
        radii = radii.to(self.certified.device, torch.float64)  # (B, K)
        certified = radii[:, :, None] >= self.thresholds[None, None, :]  # (B, K, R); NaN: never
        self.certified += certified.sum(dim=0)  # (K, R)
        self.total += radii.shape[0]
        self.radius_list.append(radii.flatten())

    def compute_table(self) -> tuple[Tensor, Tensor]:
        """``(accuracy (K, R), acr (K,))`` as float64 tensors; NaN when no example was seen."""
        count, width = int(self.total), len(self.top_k)
        if count == 0:
            nan = torch.full((width,), float("nan"), dtype=torch.float64)
            return nan[:, None].expand(self.certified.shape).clone(), nan
        radii = dim_zero_cat(self.radius_list).view(count, width)  # (N, K)
        acr = [exact_mean(column, count) for column in radii.T.tolist()]  # (K,)
        return self.certified.double() / count, torch.tensor(acr, dtype=torch.float64)

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
        """Certified accuracy against radius, one curve per k (``val`` default: ``compute()``;
        ``ax`` default: a new figure); returns ``(figure, axis)``."""
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


def markdown_table(top_k, at, accuracy, acr, description: str) -> str:
    """Certified accuracy ``(K, R)`` and ACR ``(K,)`` as a Markdown table, one row per k.

    Example:
        >>> print(markdown_table((1,), (0.0, 0.5), [[0.9, 0.5]], [0.42], "n = 100"), end="")
        Certified top-k accuracy (n = 100)
        <BLANKLINE>
        | k | r = 0 | r = 0.5 | ACR |
        |---|---|---|---|
        | top-1 | 90.0% | 50.0% | 0.420 |
    """
    head = "| k | " + " | ".join(f"r = {r:g}" for r in at) + " | ACR |"
    rule = "|---" * (len(at) + 2) + "|"
    body = [
        f"| top-{k} | " + " | ".join(f"{100 * v:.1f}%" for v in accuracy[i]) + f" | {acr[i]:.3f} |"
        for i, k in enumerate(top_k)
    ]
    return "\n".join([f"Certified top-k accuracy ({description})", "", head, rule, *body]) + "\n"


def wandb_table(top_k, at, accuracy, acr, epoch: int | None = None):
    """Certified accuracy ``(K, R)`` and ACR ``(K,)`` as a ``wandb.Table``, one row per k (the
    ``epoch`` first, when given: rows of several evaluations stay apart when compared)."""
    import wandb

    columns = ["epoch"] * (epoch is not None) + ["k", *(f"r={r:g}" for r in at), "acr"]
    rows = [[epoch] * (epoch is not None) + [k, *map(float, accuracy[i]), float(acr[i])]
            for i, k in enumerate(top_k)]  # fmt: skip
    return wandb.Table(columns=columns, data=rows)


def define_steps(experiment, keys, step: str = "trainer/global_step") -> None:
    """Plot the W&B ``keys`` against ``step``. ``define_metric`` reads a dot as nesting
    (``val/certified_top1@0.25`` would name ``25`` inside ``val/certified_top1@0``), so dots are
    escaped; keys without one already follow Lightning's ``*`` definition."""
    for key in keys:
        if "." in key:
            experiment.define_metric(key.replace(".", "\\."), step_metric=step)
