"""The decisions of the smoothed classifier from its counts: CERTIFY, PREDICT, and PREDICT with
a certified radius per label. A base of ``SmoothedClassifier``, whose ``sample_counts`` draws
the counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from certify.math.prediction import certified_prediction, select_top_k, top_k_set
from certify.math.radius import certified_radius
from certify.math.validation import (
    check_alpha,
    check_bounds,
    check_int,
    check_labels,
    check_seed,
    check_top_k,
)


class SmoothedDecisions:
    """``certify``, ``predict`` and ``predict_certified`` on top of ``sample_counts``."""

    def certify(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        top_k: int | Sequence[int],
        n: int,
        alpha: float,
        bounds: str = "simuem",
        batch_size: int | None = None,
        seed: int | None = None,
        example_ids: Sequence[int] | torch.Tensor | None = None,
        purpose: str = "certify",
    ) -> torch.Tensor:
        """Certified top-k radius of ``labels`` for every k (CERTIFY of the paper).

        ``purpose``: the noise streams' purpose (``sample_counts``).

        Returns:
            float64 ``(B, len(top_k))`` on the CPU; NaN where the label is not certified.
        """
        top_k = check_top_k(top_k, self.num_classes)
        check_alpha(alpha)
        check_bounds(bounds)
        x = self._check_inputs(x)
        labels = torch.from_numpy(check_labels(labels, x.shape[0], self.num_classes))  # (B,)
        counts = self.sample_counts(x, n, batch_size, seed, example_ids, purpose)
        return certified_radius(counts.cpu(), labels, top_k, self.sigma, alpha, bounds)

    def predict(
        self,
        x: torch.Tensor,
        k: int,
        n: int,
        alpha: float,
        batch_size: int | None = None,
        seed: int | None = None,
        example_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The top-k label set of the smoothed classifier, or a row of -1 (abstain).

        All c labels get simultaneous one-sided Clopper-Pearson bounds at level alpha / c; the
        k most frequent labels are returned only when the smallest lower bound among them
        exceeds the largest upper bound outside them. A wrong set needs a lower bound of a
        label outside the true top-k or an upper bound of one inside it to fail: c one-sided
        events of probability alpha / c each, so the set is wrong with probability <= alpha.

        Returns:
            int64 ``(B, k)`` on the CPU, labels ordered by decreasing count.
        """
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size, seed, example_ids).cpu()
        return top_k_set(counts, k, alpha)

    def predict_certified(
        self,
        x: torch.Tensor,
        k: int,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int | None = None,
        seed: int | None = None,
        example_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k label set with a certified radius for each label, or an abstention.

        ``n0`` samples of the selection streams choose the k labels (``select_top_k``); where
        they single out k labels, ``n`` fresh samples of the certify streams bound them
        (``certified_prediction``). With probability >= 1 - alpha an answer is the smoothed
        top-k set and each label l stays in it for every perturbation of l2 norm < its radius.

        Returns:
            ``(labels (B, k) int64, radii (B, k) float64)`` on the CPU; -1 and NaN = abstain.
        """
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        check_int(n, "n")
        x = self._check_inputs(x)
        ids = torch.tensor(self._example_ids(example_ids, x.shape[0]))  # (B,)
        seed = check_seed(seed)
        if seed is None:  # both samples from the same streams' seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
        selection = self.sample_counts(x, n0, batch_size, seed, ids, "selection").cpu()
        _, separated = select_top_k(selection, k)  # (B,)
        counts = torch.zeros_like(selection)  # (B, c); rows without a selection are not read
        if separated.any():
            rows = separated.to(x.device)
            counts[separated] = self.sample_counts(
                x[rows], n, batch_size, seed, ids[separated], "certify"
            ).cpu()
        return certified_prediction(selection, counts, k, self.sigma, alpha)
