"""Sequential certification with the sampler: rounds that continue each input's noise stream.

Round r of an input draws its samples ``start .. start + m - 1`` where ``start`` is what the
earlier rounds drew, so the counts after any round are those of one ``sample_counts`` call with
as many samples (``sample_counts(start=...)``; the rounds start on whole noise chunks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from certify.math.sequential import (
    DEFAULT_FIRST,
    DEFAULT_FUTILITY,
    DEFAULT_GROWTH,
    SequentialCertificate,
    certify_sequential,
    look_schedule,
)
from certify.math.validation import check_int, check_labels, check_seed
from certify.sampling.noise import check_purpose, noise_chunk


class StreamRounds:
    """``draw(m, active)``: counts of the next ``m`` samples of every active input's stream.

    Args:
        smoothed: the ``SmoothedClassifier``.
        x: ``(B, *shape)`` inputs; ``ids``: their example ids; ``seed``: the base seed (one
            for every round); ``batch_size`` and ``purpose``: as in ``sample_counts``.

    Every active input must have taken part in every earlier round (as in
    ``certify.math.sequential``, where an input that stops never comes back).

    Returns (of a call): int64 ``(B, c)`` counts on the CPU, zeros for the inactive inputs.
    """

    def __init__(self, smoothed, x: torch.Tensor, ids: list[int], seed: int, batch_size, purpose):
        self.smoothed, self.x, self.ids, self.seed = smoothed, x, ids, seed
        self.batch_size, self.purpose = batch_size, purpose
        self.drawn = 0  # samples of each active stream drawn so far

    def __call__(self, m: int, active: torch.Tensor) -> torch.Tensor:
        rows = active.nonzero().flatten().tolist()
        counts = torch.zeros(self.x.shape[0], self.smoothed.num_classes, dtype=torch.int64)
        if rows:
            counts[rows] = self.smoothed.sample_counts(
                self.x[rows], m, self.batch_size, self.seed, [self.ids[i] for i in rows],
                self.purpose, start=self.drawn,
            ).cpu()  # fmt: skip
        self.drawn += m
        return counts


class SequentialCertification:
    """``SmoothedClassifier.certify_sequential`` (the classifier inherits it from here)."""

    def certify_sequential(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        top_k: int | Sequence[int],
        radii: Sequence[float],
        n_max: int,
        alpha: float,
        batch_size: int | None = None,
        seed: int | None = None,
        example_ids: Sequence[int] | torch.Tensor | None = None,
        purpose: str = "certify",
        first: int = DEFAULT_FIRST,
        growth: float = DEFAULT_GROWTH,
        futility: float | None = DEFAULT_FUTILITY,
    ) -> SequentialCertificate:
        """Sequential CERTIFY at the target ``radii``, at most ``n_max`` samples per input.

        The looks of ``look_schedule(n_max, first, growth)`` are rounded up to whole noise
        chunks and the rounds continue each input's stream (``sampling.rounds``). Arguments
        as in ``certify`` and ``certify.math.sequential.certify_sequential``.

        Returns:
            A ``SequentialCertificate`` on the CPU: ``radius`` ``(B, K)`` (the largest target
            certified per k, NaN where none is), ``samples`` ``(B,)``, ``counts`` ``(B, c)``.
        """
        x = self._check_inputs(x)
        labels = check_labels(labels, x.shape[0], self.num_classes)  # (B,)
        ids = self._example_ids(example_ids, x.shape[0])
        seed = check_seed(seed)
        if seed is None:  # one seed for every round
            seed = int(torch.randint(0, 2**62, (1,)).item())
        chunk = noise_chunk(self.device, x.shape[1:])
        schedule = look_schedule(check_int(n_max, "n_max"), first, growth, multiple=chunk)
        draw = StreamRounds(self, x, ids, seed, batch_size, check_purpose(purpose))
        return certify_sequential(
            draw, labels, top_k, self.sigma, alpha, radii, n_max,
            num_classes=self.num_classes, schedule=schedule, futility=futility,
        )  # fmt: skip
