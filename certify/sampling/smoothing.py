"""The smoothed classifier: Monte Carlo counts of a base classifier under Gaussian noise.

An input's counts depend only on (seed, example id, purpose, sample index): see
docs/architecture.md, "The sampling loop".
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certify.math.prediction import certified_prediction, sequential_prediction, top_k_set
from certify.math.radius import certified_radius
from certify.math.sequential import (
    DEFAULT_BUDGET,
    DEFAULT_FIRST,
    DEFAULT_FUTILITY,
    DEFAULT_GROWTH,
    SequentialCertificate,
    certify_sequential,
    look_schedule,
)
from certify.math.validation import (
    UsageError,
    check_alpha,
    check_bounds,
    check_int,
    check_labels,
    check_seed,
    check_sigma,
    check_top_k,
)
from certify.sampling.noise import check_purpose, chunk_seeds, noise_chunk, stream_seed

DEFAULT_BATCH_SIZE = 1000  #: a typical batch size, for callers planning their calls
#: ``auto_batch_size``'s memory budget and caps (CPU, GPU); nothing is timed.
ACTIVATIONS = 4
CPU_BATCH_BYTES = 128 * 2**20
GPU_MEMORY_FRACTION = 0.25
MAX_BATCH = (2048, 65536)

IdsLike = Sequence[int] | torch.Tensor | None


class SmoothedClassifier:
    """Randomized smoothing of a base classifier ``model`` with noise N(0, sigma^2 I).

    Sampling runs on the model's device. The options may change the counts (numerics or
    noise layout); each keeps them reproducible and independent of the batch size.

    Args:
        model: ``(B, *input_shape)`` pixel-space inputs -> ``(B, num_classes)`` scores.
        num_classes: number of labels c.
        sigma: standard deviation of the noise, in pixel units.
        autocast_dtype: reduced precision of the forward pass (the noise stays float32+).
        channels_last: 4-D noisy batches channels-last (noise drawn in that memory order).
        compile: ``torch.compile`` the model; a string is its ``mode`` (``"reduce-overhead"``).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> smoothed = SmoothedClassifier(model, num_classes=3, sigma=0.25)
        >>> counts = smoothed.sample_counts(torch.rand(2, 4), n=100, seed=0)
        >>> counts.shape, counts.sum(dim=1).tolist()
        (torch.Size([2, 3]), [100, 100])
    """

    def __init__(
        self, model: nn.Module, num_classes: int, sigma: float,
        autocast_dtype: torch.dtype | None = None, channels_last: bool = False,
        compile: bool | str = False,
    ) -> None:  # fmt: skip
        self.model = model
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.sigma = check_sigma(sigma)
        self.autocast_dtype, self.channels_last = autocast_dtype, bool(channels_last)
        self._module = model
        if compile:  # a string names the mode; dynamic shapes after a second batch size
            try:
                mode = compile if isinstance(compile, str) else None
                self._module = torch.compile(model, mode=mode)
            except RuntimeError as err:  # "Unrecognized mode=..., should be one of: ..."
                raise UsageError(f"compile: {err}") from None
        self._batch_sizes: dict[tuple, int] = {}  # (shape, dtype, device) -> batch size

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ sampling
    def sample_counts(
        self, x: torch.Tensor, n: int, batch_size: int | None = None, seed: int | None = None,
        example_ids: IdsLike = None, purpose: str = "certify", start: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """``(B, num_classes)`` int64 counts (on the model's device) of ``n`` noisy copies each.

        Args:
            x: ``(B, *input_shape)`` float inputs in pixel space.
            n: noisy samples per input.
            batch_size: samples per forward pass (default ``auto_batch_size``; no effect on counts).
            seed: base seed; ``None`` draws one from torch's global RNG.
            example_ids: ``(B,)`` ids naming the noise streams (default ``0..B-1``).
            purpose: ``"certify"``, ``"validation"`` or ``"selection"`` (``noise.PURPOSES``).
            start: first sample index of each stream, a multiple of ``noise_chunk``.
        """
        x, ids, seed = self._check(x, seed, example_ids, n=n, batch_size=batch_size)
        check_purpose(purpose)
        chunk = noise_chunk(self.device, x.shape[1:])
        if check_int(start, "start", low=0) % chunk:
            raise UsageError(
                f"start must be a multiple of the noise chunk ({chunk} samples for these "
                f"inputs on {self.device.type}), got {start}"
            )
        return self._counts(x, n, batch_size, seed, ids, purpose, start)

    def auto_batch_size(self, input_shape: Sequence[int], dtype=torch.float32) -> int:
        """The largest power of two (<= ``MAX_BATCH``) whose inputs and ``ACTIVATIONS`` copies of
        the largest leaf output per sample fit ``CPU_BATCH_BYTES`` (CPU) or
        ``GPU_MEMORY_FRACTION`` of free GPU memory; chosen once per shape, dtype and device."""
        device = self.device
        key = (tuple(input_shape), dtype, str(device))
        if key in self._batch_sizes:
            return self._batch_sizes[key]
        largest = [0]  # bytes of the largest leaf output seen

        def hook(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor):
                largest[0] = max(largest[0], output.numel() * output.element_size())

        leaves = [m for m in self.model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(hook) for m in leaves]
        probe = torch.zeros((2, *input_shape), dtype=dtype, device=device)  # (2, *shape)
        try:
            with self._evaluating():
                self.model(probe)
        finally:
            for handle in handles:
                handle.remove()
        per_sample = probe[0].numel() * probe.element_size() + ACTIVATIONS * largest[0] // 2
        if device.type == "cpu":
            budget, cap = CPU_BATCH_BYTES, MAX_BATCH[0]
        else:
            budget, cap = GPU_MEMORY_FRACTION * torch.cuda.mem_get_info(device)[0], MAX_BATCH[1]
        fits = max(1, min(cap, int(budget // per_sample)))
        self._batch_sizes[key] = 1 << (fits.bit_length() - 1)
        return self._batch_sizes[key]

    def _counts(self, x, n, batch_size, seed, ids, purpose, start=0) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.device, dtype=dtype)  # (B, *shape)
        batch_size = batch_size or self.auto_batch_size(x.shape[1:], dtype)
        with self._evaluating():
            return self._sample(x, n, min(batch_size, x.shape[0] * n), seed, ids, purpose, start)

    def _sample(self, x, n, batch_size, seed, ids, purpose, start) -> torch.Tensor:
        """THE SAMPLING LOOP (docs/architecture.md): whole noise chunks fill a buffer, full
        batches are classified and counted, the rows left over move to the front. Counting
        ignores order: the counts are the streams' whatever the batch size and other inputs."""
        device, c, shape = x.device, self.num_classes, x.shape[1:]
        chunk = noise_chunk(device, shape)
        first, chunks = start // chunk, -(-n // chunk)  # this call's chunks of each stream
        rows = min(batch_size + chunk - 1, x.shape[0] * n)  # the most ever filled at once
        layout = torch.contiguous_format
        if self.channels_last and x.ndim == 4:
            layout = torch.channels_last
        noisy = torch.empty((rows, *shape), dtype=x.dtype, device=device, memory_format=layout)
        memory_order = noisy.permute(0, 2, 3, 1) if layout == torch.channels_last else noisy
        owner = torch.empty(rows, dtype=torch.int64, device=device)  # (rows,) b * c per row
        streams = [stream_seed(seed, i, purpose) for i in ids]  # after the buffer: it may not fit
        seeds = chunk_seeds(streams, first + chunks)[:, first:]  # (B, chunks) uint64
        ones = torch.ones(batch_size, dtype=torch.int64, device=device)  # (batch_size,)
        counts = torch.zeros(x.shape[0] * c, dtype=torch.int64, device=device)  # (B * c,)
        generator = torch.Generator(device=device)
        filled = 0  # rows holding noisy samples not yet classified

        def classify(lo: int, hi: int) -> None:
            labels = self._labels(noisy[lo:hi])  # (hi - lo,)
            counts.index_add_(0, owner[lo:hi] + labels, ones[: hi - lo])  # (B * c,)

        for j in range(chunks):
            length = min(chunk, n - j * chunk)  # the last chunk of a stream may be shorter
            for b in range(x.shape[0]):
                rows_b = slice(filled, filled + length)
                generator.manual_seed(int(seeds[b, j]))
                memory_order[rows_b].normal_(0.0, self.sigma, generator=generator)
                noisy[rows_b].add_(x[b])  # (length, *shape) noise + input
                owner[rows_b].fill_(b * c)
                filled += length
                if filled >= batch_size:
                    full = filled - filled % batch_size
                    for lo in range(0, full, batch_size):
                        classify(lo, lo + batch_size)
                    filled -= full  # < batch_size <= full: the two ranges are disjoint
                    noisy[:filled].copy_(noisy[full : full + filled])
                    owner[:filled].copy_(owner[full : full + filled])
        if filled:
            classify(0, filled)
        return counts.view(x.shape[0], c)

    def _labels(self, batch: torch.Tensor) -> torch.Tensor:
        if self._module is not self.model:  # compiled: a new CUDA-graph step per batch
            torch.compiler.cudagraph_mark_step_begin()
        precision = contextlib.nullcontext()
        if self.autocast_dtype is not None:
            precision = torch.autocast(batch.device.type, self.autocast_dtype)
        with precision:
            scores = self._module(batch)  # (m, c)
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise UsageError(
                f"the model returned scores of shape {tuple(scores.shape)}, "
                f"expected (batch, {self.num_classes})"
            )
        return scores.argmax(dim=1)  # (m,)

    @contextlib.contextmanager
    def _evaluating(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ checks
    def _check(self, x, seed, example_ids, **positive) -> tuple[torch.Tensor, list[int], int]:
        """Checked ``(x, example ids, seed)``; ``positive``: integers >= 1 (batch_size: or None)."""
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2:
            raise UsageError(f"x must have shape (B, *input_shape), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise UsageError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise UsageError("x contains NaN or infinite values")
        for name, value in positive.items():
            check_int(value, name, optional=name == "batch_size")
        if example_ids is None:
            ids = list(range(x.shape[0]))
        else:
            ids = list(example_ids.tolist() if hasattr(example_ids, "tolist") else example_ids)
            ok = all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids)
            if len(ids) != x.shape[0] or not ok or any(i < 0 for i in ids):
                raise UsageError(
                    f"example_ids must be {x.shape[0]} non-negative integers, got {ids!r}"
                )
        seed = check_seed(seed)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return x, [int(i) for i in ids], seed

    # ------------------------------------------------------------------ decisions
    def certify(
        self, x: torch.Tensor, labels: torch.Tensor, top_k: int | Sequence[int], n: int,
        alpha: float, bounds: str = "simuem", batch_size: int | None = None,
        seed: int | None = None, example_ids: IdsLike = None, purpose: str = "certify",
        return_counts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """CERTIFY: float64 ``(B, len(top_k))`` radii of ``labels`` on the CPU, NaN = not
        certified; with ``return_counts`` also the ``(B, c)`` counts."""
        x, ids, seed = self._check(x, seed, example_ids, n=n, batch_size=batch_size)
        top_k = check_top_k(top_k, self.num_classes)
        check_alpha(alpha)
        check_bounds(bounds)
        check_purpose(purpose)
        labels = torch.from_numpy(check_labels(labels, x.shape[0], self.num_classes))  # (B,)
        counts = self._counts(x, n, batch_size, seed, ids, purpose).cpu()  # (B, c)
        radii = certified_radius(counts, labels, top_k, self.sigma, alpha, bounds)  # (B, K)
        return (radii, counts) if return_counts else radii

    def predict(
        self, x: torch.Tensor, k: int, n: int, alpha: float, batch_size: int | None = None,
        seed: int | None = None, example_ids: IdsLike = None,
    ) -> torch.Tensor:  # fmt: skip
        """The smoothed top-k set, int64 ``(B, k)`` on the CPU by decreasing count, or a row of
        -1 (abstain); wrong with probability <= alpha (``certify.math.prediction.top_k_set``)."""
        x, ids, seed = self._check(x, seed, example_ids, n=n, batch_size=batch_size)
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        counts = self._counts(x, n, batch_size, seed, ids, "certify").cpu()  # (B, c)
        return top_k_set(counts, k, alpha)

    def predict_certified(
        self, x: torch.Tensor, k: int, n0: int, n: int, alpha: float,
        batch_size: int | None = None, seed: int | None = None, example_ids: IdsLike = None,
        return_counts: bool = False,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """``(labels (B, k), radii (B, k))`` on the CPU: ``n0`` selection samples choose k
        labels, ``n`` fresh certify samples give each its top-k radius, NaN = not certified; a
        row of -1 (abstain) has none certified (``certify.math.prediction.certified_prediction``).
        With ``return_counts`` also both ``(B, c)`` counts."""
        x, ids, seed = self._check(x, seed, example_ids, n0=n0, n=n, batch_size=batch_size)
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        selection = self._counts(x, n0, batch_size, seed, ids, "selection").cpu()  # (B, c)
        counts = self._counts(x, n, batch_size, seed, ids, "certify").cpu()  # (B, c)
        chosen, radii = certified_prediction(selection, counts, k, self.sigma, alpha)
        return (chosen, radii, selection, counts) if return_counts else (chosen, radii)

    def _rounds(self, x, ids, n_max, first, growth, batch_size, seed, purpose):
        """The looks (in whole noise chunks) and ``draw(m, active)`` for ``certify_sequential``:
        each round continues every active stream where the last stopped, so counts equal one
        longer call's."""
        chunk = noise_chunk(self.device, x.shape[1:])
        schedule = look_schedule(n_max, first, growth, multiple=chunk)
        drawn = [0]  # samples of each active stream drawn so far

        def draw(m: int, active: torch.Tensor) -> torch.Tensor:
            counts = torch.zeros(x.shape[0], self.num_classes, dtype=torch.int64)  # (B, c)
            rows = active.nonzero().flatten().tolist()
            if rows:
                chosen = [ids[i] for i in rows]
                counts[rows] = self._counts(
                    x[rows], m, batch_size, seed, chosen, purpose, drawn[0]
                ).cpu()
            drawn[0] += m
            return counts

        return schedule, draw

    def predict_sequential(
        self, x: torch.Tensor, k: int, n0: int, radii: Sequence[float], n_max: int,
        alpha: float, batch_size: int | None = None, seed: int | None = None,
        example_ids: IdsLike = None, first: int = DEFAULT_FIRST, growth: float = DEFAULT_GROWTH,
        futility: float | None = DEFAULT_FUTILITY, budget: float = DEFAULT_BUDGET,
        return_counts: bool = False,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """``(labels (B, k), radius (B, k), samples (B,))`` on the CPU: ``n0`` selection
        samples choose k labels, certify samples drawn in rounds (at most ``n_max``) give each
        the largest target of ``radii`` certified, NaN = none; a row of -1 (abstain) has none
        (``certify.math.prediction.sequential_prediction``). ``samples`` counts the certify
        samples drawn (the rounds as in ``certify_sequential``). With ``return_counts`` also
        the ``(B, c)`` selection counts and certify counts."""
        x, ids, seed = self._check(x, seed, example_ids, n0=n0, n_max=n_max, batch_size=batch_size)
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        selection = self._counts(x, n0, batch_size, seed, ids, "selection").cpu()  # (B, c)
        schedule, draw = self._rounds(x, ids, n_max, first, growth, batch_size, seed, "certify")
        labels, radius, samples, counts = sequential_prediction(
            selection, draw, k, self.sigma, alpha, radii, n_max,
            schedule=schedule, futility=futility, budget=budget,
        )  # fmt: skip
        answer = (labels, radius, samples)
        return (*answer, selection, counts) if return_counts else answer

    def certify_sequential(
        self, x: torch.Tensor, labels: torch.Tensor, top_k: int | Sequence[int],
        radii: Sequence[float], n_max: int, alpha: float, batch_size: int | None = None,
        seed: int | None = None, example_ids: IdsLike = None, purpose: str = "certify",
        first: int = DEFAULT_FIRST, growth: float = DEFAULT_GROWTH,
        futility: float | None = DEFAULT_FUTILITY, budget: float = DEFAULT_BUDGET,
    ) -> SequentialCertificate:  # fmt: skip
        """Sequential CERTIFY at ``radii``, at most ``n_max`` samples per input: a
        ``SequentialCertificate`` on the CPU. Each round continues every active stream where
        the last stopped (looks in whole noise chunks), so counts equal one longer call's."""
        x, ids, seed = self._check(x, seed, example_ids, n_max=n_max, batch_size=batch_size)
        labels = check_labels(labels, x.shape[0], self.num_classes)  # (B,)
        check_purpose(purpose)
        schedule, draw = self._rounds(x, ids, n_max, first, growth, batch_size, seed, purpose)
        return certify_sequential(
            draw, labels, top_k, self.sigma, alpha, radii, n_max,
            num_classes=self.num_classes, schedule=schedule, futility=futility, budget=budget,
        )  # fmt: skip
