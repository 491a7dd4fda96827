"""The smoothed classifier: Monte Carlo counts of a base classifier under Gaussian noise.

Reproducibility: the noise of every input is a pure function of ``(seed, example_id,
sample index)`` on a given device type (``certify.sampling.noise``), so the counts of an input
do not depend on the batch size, on the other inputs of the call or on the process that
handles it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certify.math.validation import (
    check_int,
    check_seed,
    check_sigma,
)
from certify.sampling.batching import LabelForward, auto_batch_size
from certify.sampling.decisions import SmoothedDecisions
from certify.sampling.noise import ChunkNoise, add_inputs, check_purpose, noise_chunk
from certify.sampling.packing import capacity, plan
from certify.sampling.rounds import SequentialCertification

#: A typical batch size, for callers planning how many inputs to pass per call; the sampler
#: itself tunes the batch size when none is given (``SmoothedClassifier.auto_batch_size``).
DEFAULT_BATCH_SIZE = 1000


def _model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


class SmoothedClassifier(SmoothedDecisions, SequentialCertification):
    """Randomized smoothing of a base classifier ``model`` with noise N(0, sigma^2 I).

    Sampling runs on the model's device: the noise is drawn there, several inputs share a
    forward batch when n is small, the counts stay there (no host round trip per batch) and
    at most one batch of noisy inputs exists at a time. Without an explicit ``batch_size``
    the sampler uses the batch size with the best forward throughput, tuned once per model,
    input shape, dtype, device and options (see ``certify.sampling.batching``).

    Args:
        model: base classifier mapping ``(B, *input_shape)`` inputs in [0, 1] pixel space to
            ``(B, num_classes)`` scores. Its first module should normalise, so that the noise
            is added before normalisation.
        num_classes: number of labels c.
        sigma: standard deviation of the Gaussian noise, in input (pixel) units.
        autocast_dtype: optional reduced precision for the forward pass (e.g.
            ``torch.bfloat16``). The noise is always drawn in float32 or wider.
        channels_last: lay 4-D noisy batches out channels-last (the noise is drawn in that
            memory order, so the counts differ from the default layout's).
        compile: run the model through ``torch.compile`` (compiles on first use).
        cuda_graphs: replay full batches from a CUDA graph (CUDA only, ignored elsewhere);
            keeps one batch of inputs allocated between calls.

    The options change the base classifier's numerics or the noise layout, so they may change
    the counts; each keeps them reproducible and independent of the batch size.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> smoothed = SmoothedClassifier(model, num_classes=3, sigma=0.25)
        >>> counts = smoothed.sample_counts(torch.rand(2, 4), n=100, seed=0)
        >>> counts.shape, counts.sum(dim=1).tolist()
        (torch.Size([2, 3]), [100, 100])
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = model
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.sigma = check_sigma(sigma)
        self.autocast_dtype = autocast_dtype
        self._forward = LabelForward(
            model, num_classes, autocast_dtype, channels_last, compile, cuda_graphs
        )

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    # ------------------------------------------------------------------ sampling
    def _check_inputs(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (B, *input_shape), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")
        return x

    @torch.inference_mode()
    def auto_batch_size(
        self, input_shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> int:
        """The batch size ``sample_counts`` uses when none is given (tuned once, then cached).

        Args:
            input_shape: the shape of one input, e.g. ``(3, 32, 32)``.
            dtype: the dtype of the noisy inputs (float32, or float64 for float64 inputs).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            return auto_batch_size(
                self.model, self._forward, tuple(input_shape), dtype, self.device
            )
        finally:
            self.model.train(was_training)

    @torch.inference_mode()
    def sample_counts(
        self,
        x: torch.Tensor,
        n: int,
        batch_size: int | None = None,
        seed: int | None = None,
        example_ids: Sequence[int] | torch.Tensor | None = None,
        purpose: str = "certify",
        start: int = 0,
    ) -> torch.Tensor:
        """Count the base classifier's predictions on ``n`` noisy copies of each input.

        Args:
            x: ``(B, *input_shape)`` float inputs in pixel space.
            n: number of noisy samples per input.
            batch_size: noisy samples per forward pass (several inputs share a batch when n is
                small). Defaults to the tuned ``auto_batch_size``; never more than the call's
                ``B * n`` samples (the counts do not depend on it).
            seed: base seed. With a seed, each input's noise depends only on
                ``(seed, example_id)``; without one, a seed is drawn from torch's global RNG.
            example_ids: ``(B,)`` integer ids naming the inputs' noise streams (e.g. their
                dataset indices); defaults to ``0..B-1``.
            purpose: what the samples are for (``certify.sampling.noise.PURPOSES``):
                ``"certify"``, ``"validation"`` (the callback) or ``"selection"`` (samples
                that choose labels); the same seed and id give unrelated noise for each.
            start: index of the first sample of each stream (samples ``start .. start + n -
                1``), a multiple of the noise chunk (``noise_chunk``: 128 on a CPU). Rounds
                ``[0, a)`` and ``[a, b)`` count the same samples as one call ``[0, b)``.

        Returns:
            ``(B, num_classes)`` int64 counts on the model's device; every row sums to n.
        """
        x = self._check_inputs(x)
        n = check_int(n, "n")
        batch_size = check_int(batch_size, "batch_size", optional=True)
        ids = self._example_ids(example_ids, x.shape[0])
        seed = check_seed(seed)
        check_purpose(purpose)
        start = check_int(start, "start", low=0)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        noise_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.device, dtype=noise_dtype)  # (B, *shape)
        was_training = self.model.training
        self.model.eval()
        try:
            if batch_size is None:
                batch_size = auto_batch_size(
                    self.model,
                    self._forward,
                    tuple(x.shape[1:]),
                    noise_dtype,
                    x.device,
                    samples=x.shape[0] * n,
                )
            chunk = noise_chunk(x.device, x.shape[1:])
            if start % chunk:
                raise ValueError(
                    f"start must be a multiple of the noise chunk ({chunk} samples for these "
                    f"inputs on {x.device.type}), got {start}"
                )
            batch_size = min(batch_size, x.shape[0] * n)  # no buffer beyond the call's needs
            return self._sample(x, n, batch_size, seed, ids, chunk, purpose, start // chunk)
        finally:
            self.model.train(was_training)

    def _sample(
        self, x: torch.Tensor, n: int, batch_size: int, seed: int, ids: list[int], chunk: int,
        purpose: str = "certify", first_chunk: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """The sampling loop (model in eval mode, inference mode on); see ``sampling.packing``.

        ``chunk``: samples per noise chunk (``noise_chunk``; part of the counts' identity);
        ``first_chunk``: the stream's chunk that the plan's chunk 0 is.
        """
        device, c = x.device, self.num_classes
        rows = capacity(batch_size, chunk)
        counts = torch.zeros(x.shape[0] * c, dtype=torch.int64, device=device)  # (B * c,)
        noisy = self._forward.buffer(rows, x.shape[1:], x.dtype, device)  # (rows, *shape)
        owner = torch.empty(rows, dtype=torch.int64, device=device)  # (rows,) b * c
        ones = torch.ones(batch_size, dtype=torch.int64, device=device)  # (batch_size,)
        draw = ChunkNoise(noisy, self.sigma, seed, ids, -(-n // chunk), purpose, first_chunk)
        # Rows whose input is yet to be added: runs [input, first row, end row] that follow
        # each other in the buffer (added together, before anything can overwrite them).
        runs: list[list[int]] = []
        offsets = torch.arange(x.shape[0], device=device) * c  # (B,) b * c

        for ops in plan(x.shape[0], n, batch_size, chunk):
            for op in ops:
                if op[0] == "noise":
                    _, b, j, length, row = op
                    if runs and row == runs[-1][2]:
                        if b == runs[-1][0]:
                            runs[-1][2] += length
                        else:
                            runs.append([b, row, row + length])
                    else:  # elsewhere in the buffer: what is pending first
                        add_inputs(noisy, owner, x, offsets, runs)
                        runs = [[b, row, row + length]]
                    draw(b, j, row, length)
                    continue
                add_inputs(noisy, owner, x, offsets, runs)
                runs = []
                if op[0] == "copy":
                    _, src, dst, m = op
                    noisy[dst : dst + m].copy_(noisy[src : src + m])
                    owner[dst : dst + m].copy_(owner[src : src + m])
                else:
                    _, lo, hi = op
                    labels = self._forward(noisy[lo:hi])  # (m,)
                    counts.index_add_(0, owner[lo:hi] + labels, ones[: hi - lo])
        return counts.view(x.shape[0], c)

    @staticmethod
    def _example_ids(example_ids, batch: int) -> list[int]:
        if example_ids is None:
            return list(range(batch))
        if isinstance(example_ids, (torch.Tensor, np.ndarray)):
            ids = example_ids.tolist()  # Python ints (floats stay floats and are refused)
        else:
            ids = list(example_ids)
        ok = all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids
        )
        if len(ids) != batch or not ok:
            raise ValueError(f"example_ids must be {batch} non-negative integers, got {ids!r}")
        return [int(i) for i in ids]
