"""The smoothed classifier: Monte Carlo counts of a base classifier under Gaussian noise.

Reproducibility: the noise of every input is a pure function of ``(seed, example_id, purpose,
sample index)`` on a given device type (``certify.sampling.noise``), so the counts of an input
do not depend on the batch size, on the other inputs of the call or on the process that
handles it.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from certify.math.prediction import certified_prediction, select_top_k, top_k_set
from certify.math.radius import certified_radius
from certify.math.sequential import (
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

#: A typical batch size, for callers planning how many inputs to pass per call; the sampler
#: itself chooses the batch size when none is given (``SmoothedClassifier.auto_batch_size``).
DEFAULT_BATCH_SIZE = 1000
#: The automatic batch size: the largest power of two whose noisy inputs and activations
#: (``ACTIVATIONS`` times the largest output of a leaf module, per sample) fit in
#: ``CPU_BATCH_BYTES`` on a CPU, in ``GPU_MEMORY_FRACTION`` of the free memory on a GPU, and
#: at most ``MAX_BATCH`` (CPU, GPU). On a CPU a larger batch is no faster; on a GPU it is.
ACTIVATIONS = 4
CPU_BATCH_BYTES = 128 * 2**20
GPU_MEMORY_FRACTION = 0.25
MAX_BATCH = (2048, 65536)

IdsLike = Sequence[int] | torch.Tensor | None


class SmoothedClassifier:
    """Randomized smoothing of a base classifier ``model`` with noise N(0, sigma^2 I).

    Sampling runs on the model's device: the noise is drawn there, several inputs share a
    forward batch when n is small, the counts stay there (no host round trip per batch) and
    at most one batch (plus one noise chunk) of noisy inputs exists at a time.

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
        compile: run the model through ``torch.compile`` (compiled on first use); a string
            is its ``mode``, e.g. ``"reduce-overhead"`` (CUDA graphs on a GPU).

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
        """Count the base classifier's predictions on ``n`` noisy copies of each input.

        Args:
            x: ``(B, *input_shape)`` float inputs in pixel space.
            n: number of noisy samples per input.
            batch_size: noisy samples per forward pass (several inputs share a batch when n is
                small). Defaults to ``auto_batch_size``; never more than the call's ``B * n``
                samples (the counts do not depend on it).
            seed: base seed. With a seed, each input's noise depends only on
                ``(seed, example_id, purpose)``; without one, a seed is drawn from torch's
                global RNG.
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
        """The batch size ``sample_counts`` uses when none is given (chosen once, then kept).

        The largest power of two, at most ``MAX_BATCH``, whose inputs and ``ACTIVATIONS``
        copies of the largest leaf-module output per sample (found by a forward pass of two
        zero inputs) fit in the memory budget: ``CPU_BATCH_BYTES``, or on a GPU
        ``GPU_MEMORY_FRACTION`` of its free memory. No timing: a busy machine gets the same.

        Args:
            input_shape: the shape of one input, e.g. ``(3, 32, 32)``.
            dtype: the dtype of the noisy inputs (float32, or float64 for float64 inputs).
        """
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
        """``sample_counts`` on checked arguments: model in eval mode, inference mode on."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(device=self.device, dtype=dtype)  # (B, *shape)
        batch_size = batch_size or self.auto_batch_size(x.shape[1:], dtype)
        with self._evaluating():
            return self._sample(x, n, min(batch_size, x.shape[0] * n), seed, ids, purpose, start)

    def _sample(self, x, n, batch_size, seed, ids, purpose, start) -> torch.Tensor:
        """THE SAMPLING LOOP: whole noise chunks into a buffer, full batches out of it.

        Chunk j of every input is drawn whole (``certify.sampling.noise``) after the rows
        already in the buffer, and the input is added to it. Whenever ``batch_size`` rows or
        more are filled, full batches are classified and counted, and the rows left over
        (fewer than a batch) move to the front; a last partial batch ends the loop. A count
        does not depend on the order in which samples are seen, so the counts are those of
        the noise streams whatever the batch size and the other inputs.
        """
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
        """Forward pass (with the options) and argmax: ``(m, *shape)`` -> ``(m,)``."""
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
        """The model in eval mode under inference mode; its mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------------ checks
    def _check(self, x, seed, example_ids, **positive) -> tuple[torch.Tensor, list[int], int]:
        """Check the sampling arguments once: ``(x, example ids, seed)``; a seed is drawn from
        torch's global RNG when none is given. ``positive``: integers >= 1 (or None for
        ``batch_size``)."""
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
        """Certified top-k radius of ``labels`` for every k (CERTIFY of the paper).

        ``purpose``: the noise streams' purpose (``sample_counts``).

        Returns:
            float64 ``(B, len(top_k))`` on the CPU; NaN where the label is not certified.
            With ``return_counts``: ``(radii, counts (B, c) int64)``.
        """
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
        """The top-k label set of the smoothed classifier, or a row of -1 (abstain).

        All c labels get simultaneous one-sided Clopper-Pearson bounds at level alpha / c; the
        k most frequent labels are returned only when the smallest lower bound among them
        exceeds the largest upper bound outside them. A wrong set needs a lower bound of a
        label outside the true top-k or an upper bound of one inside it to fail: c one-sided
        events of probability alpha / c each, so the set is wrong with probability <= alpha.

        Returns:
            int64 ``(B, k)`` on the CPU, labels ordered by decreasing count.
        """
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
        """The top-k label set with a certified radius for each label, or an abstention.

        ``n0`` samples of the selection streams choose the k labels (``select_top_k``); where
        they single out k labels, ``n`` fresh samples of the certify streams bound them
        (``certified_prediction``). With probability >= 1 - alpha an answer is the smoothed
        top-k set and each label l stays in it for every perturbation of l2 norm < its radius.

        Returns:
            ``(labels (B, k) int64, radii (B, k) float64)`` on the CPU; -1 and NaN = abstain.
            With ``return_counts`` also the selection counts and the fresh counts ``(B, c)``
            (zeros where no k labels were singled out).
        """
        x, ids, seed = self._check(x, seed, example_ids, n0=n0, n=n, batch_size=batch_size)
        (k,) = check_top_k(k, self.num_classes)
        check_alpha(alpha)
        selection = self._counts(x, n0, batch_size, seed, ids, "selection").cpu()  # (B, c)
        _, separated = select_top_k(selection, k)  # (B,) bool
        counts = torch.zeros_like(selection)  # (B, c); rows without a selection are not read
        if separated.any():
            rows = separated.nonzero().flatten().tolist()
            chosen = [ids[i] for i in rows]
            counts[rows] = self._counts(x[rows], n, batch_size, seed, chosen, "certify").cpu()
        chosen, radii = certified_prediction(selection, counts, k, self.sigma, alpha)
        return (chosen, radii, selection, counts) if return_counts else (chosen, radii)

    def certify_sequential(
        self, x: torch.Tensor, labels: torch.Tensor, top_k: int | Sequence[int],
        radii: Sequence[float], n_max: int, alpha: float, batch_size: int | None = None,
        seed: int | None = None, example_ids: IdsLike = None, purpose: str = "certify",
        first: int = DEFAULT_FIRST, growth: float = DEFAULT_GROWTH,
        futility: float | None = DEFAULT_FUTILITY,
    ) -> SequentialCertificate:  # fmt: skip
        """Sequential CERTIFY at the target ``radii``, at most ``n_max`` samples per input.

        The looks of ``look_schedule(n_max, first, growth)`` are rounded up to whole noise
        chunks, and round r draws samples ``start .. start + m - 1`` of each still active
        input's stream, ``start`` being what the earlier rounds drew: the counts after any
        round are those of one ``sample_counts`` call with as many samples. Arguments as in
        ``certify`` and ``certify.math.sequential.certify_sequential``.

        Returns:
            A ``SequentialCertificate`` on the CPU: ``radius`` ``(B, K)`` (the largest target
            certified per k, NaN where none is), ``samples`` ``(B,)``, ``counts`` ``(B, c)``.
        """
        x, ids, seed = self._check(x, seed, example_ids, n_max=n_max, batch_size=batch_size)
        labels = check_labels(labels, x.shape[0], self.num_classes)  # (B,)
        check_purpose(purpose)
        chunk = noise_chunk(self.device, x.shape[1:])
        schedule = look_schedule(n_max, first, growth, multiple=chunk)
        drawn = [0]  # samples of each active stream drawn so far

        def draw(m: int, active: torch.Tensor) -> torch.Tensor:
            """Counts of the next ``m`` samples of each active input; zeros elsewhere."""
            counts = torch.zeros(x.shape[0], self.num_classes, dtype=torch.int64)  # (B, c)
            rows = active.nonzero().flatten().tolist()
            if rows:
                chosen = [ids[i] for i in rows]
                counts[rows] = self._counts(
                    x[rows], m, batch_size, seed, chosen, purpose, drawn[0]
                ).cpu()
            drawn[0] += m
            return counts

        return certify_sequential(
            draw, labels, top_k, self.sigma, alpha, radii, n_max,
            num_classes=self.num_classes, schedule=schedule, futility=futility,
        )  # fmt: skip
