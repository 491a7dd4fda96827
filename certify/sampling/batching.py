"""How the sampler runs its batches: the labelling forward pass and the automatic batch size.

``LabelForward`` turns a batch of noisy inputs into predicted labels (forward pass + argmax)
with the optional speed-ups of ``SmoothedClassifier``: reduced-precision autocast,
channels-last memory format, ``torch.compile`` and CUDA graphs.

``auto_batch_size`` finds the batch size with the best forward throughput that fits in
memory: powers of two are timed on dummy data of the right shape, growing until the
throughput stops improving or memory runs out. The answer is cached per model (weakly, so the
cache never keeps a model alive), input shape, dtype, device and forward options.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

CPU_CANDIDATES = tuple(2**i for i in range(5, 14))  # 32 .. 8192
GPU_CANDIDATES = tuple(2**i for i in range(5, 17))  # 32 .. 65536
CPU_MEMORY_FRACTION = 0.25  # of MemAvailable, for one batch of inputs and activations
CPU_MEMORY_CAP = 4 * 2**30  # bytes
GAIN = 1.02  # a larger batch must be this much faster to count as an improvement
PATIENCE = 2  # candidates in a row without improvement before the search stops
#: On a GPU growth does not stop for want of improvement: cuDNN can switch to a faster
#: algorithm several sizes further (seen on an H200: ResNet-20 flat from 4,096 to 32,768, then
#: 11 % faster at 65,536), and a pass is cheap there until ``SLOW_FORWARD_S``.
GPU_PATIENCE = len(GPU_CANDIDATES)
WARM_UP = 2  # untimed passes per candidate (algorithm selection, allocator warm-up) ...
MIN_TIME_S = 0.1  # ... then time at least this long ...
MIN_REPEATS, MAX_REPEATS = 3, 8  # ... in this many passes (the median one counts)
SLOW_FORWARD_S = 0.5  # no larger candidate once a single forward pass takes this long
CONTENDERS = 3  # the best candidates of the growth phase ...
EXTRA_ROUNDS = 4  # ... are timed again in this many round-robin rounds
TIME_BUDGET_S = 10.0  # no larger candidate after this much timing (compilation not counted)
RETIME_BUDGET_S = 3.0  # no re-timing of the contenders after this much timing in all
#: When the sampler tunes for a call of known size, both budgets shrink to this share of the
#: call's sampling time at the best rate seen so far, but not below ``MIN_BUDGET_S``.
JOB_SHARE, MIN_BUDGET_S = 0.5, 1.0

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


class LabelForward:
    """Noisy batch ``(m, *input_shape)`` -> predicted labels ``(m,)`` of the base classifier.

    Args:
        model: the base classifier (already in ``eval()`` when called).
        num_classes: expected width of the model's scores.
        autocast_dtype: forward pass under ``torch.autocast`` with this dtype, or ``None``.
        channels_last: noisy batches of 4-D inputs are laid out channels-last.
        compile: run the model through ``torch.compile``.
        cuda_graphs: replay the forward pass of full batches from a CUDA graph (CUDA only);
            the graph's static input buffer is kept between calls.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        cuda_graphs: bool = False,
    ) -> None:
        self.model, self.num_classes = model, num_classes
        self.autocast_dtype, self.channels_last = autocast_dtype, bool(channels_last)
        self.compile, self.cuda_graphs = bool(compile), bool(cuda_graphs)
        self._module: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if self.compile else model
        )
        self._graph: tuple | None = None  # (key, graph, static input, static labels)

    @property
    def key(self) -> tuple:
        """The options that change the forward pass (part of the batch-size cache key)."""
        return (self.autocast_dtype, self.channels_last, self.compile, self.cuda_graphs)

    def buffer(self, rows: int, sample_shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A ``(rows, *sample_shape)`` buffer for noisy inputs (zeroed when new).

        Channels-last when asked (4-D batches only); with CUDA graphs, the graph's persistent
        static input (so that a full batch is replayed without a copy).
        """
        device = torch.device(device)
        if self.cuda_graphs and device.type == "cuda":
            key = (rows, tuple(sample_shape), dtype, device)
            if self._graph is None or self._graph[0] != key:
                self._graph = (key, None, self.empty(rows, sample_shape, dtype, device), None)
            return self._graph[2]
        return self.empty(rows, sample_shape, dtype, device)

    def empty(self, rows, sample_shape, dtype, device) -> torch.Tensor:
        """A zeroed ``(rows, *sample_shape)`` tensor in the forward pass's memory format."""
        layout = torch.contiguous_format
        if self.channels_last and len(sample_shape) == 3:
            layout = torch.channels_last
        shape = (rows, *sample_shape)
        return torch.empty(shape, dtype=dtype, device=device, memory_format=layout).zero_()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        graph = self._graph
        if graph is not None and batch.data_ptr() == graph[2].data_ptr():
            rows = graph[2].shape[0]
            if 2 * batch.shape[0] >= rows:  # replaying a full graph is worth it
                if graph[1] is None:
                    self._graph = graph = self._capture(graph)
                graph[1].replay()
                return graph[3][: batch.shape[0]]  # (m,)
        return self.labels(batch)

    def labels(self, batch: torch.Tensor) -> torch.Tensor:
        """Eager (or compiled) forward pass and argmax: ``(m, *shape)`` -> ``(m,)``."""
        if self.autocast_dtype is not None:
            # Autocast's weight cache must stay off inside a CUDA graph capture.
            cache = not self.cuda_graphs
            with torch.autocast(batch.device.type, self.autocast_dtype, cache_enabled=cache):
                scores = self._module(batch)  # (m, c)
        else:
            scores = self._module(batch)  # (m, c)
        if scores.ndim != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned scores of shape {tuple(scores.shape)}, "
                f"expected (batch, {self.num_classes})"
            )
        return scores.argmax(dim=1)  # (m,)

    def _capture(self, graph: tuple) -> tuple:
        """Capture the forward pass of the whole static input in a CUDA graph."""
        key, _, static_in, _ = graph
        stream = torch.cuda.Stream(device=static_in.device)
        stream.wait_stream(torch.cuda.current_stream(static_in.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (cuDNN autotuning, lazy init) outside the capture
                self.labels(static_in)
        torch.cuda.current_stream(static_in.device).wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            static_labels = self.labels(static_in)  # (rows,)
        return key, cuda_graph, static_in, static_labels


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def cached_batch_sizes(model: nn.Module) -> dict[tuple, int]:
    """The batch sizes tuned so far for ``model``: ``{(shape, dtype, device, options): size}``."""
    return dict(_CACHE.get(model, {}))


def clear_batch_size_cache() -> None:
    """Forget every tuned batch size (they are found again on the next call)."""
    _CACHE.clear()


def auto_batch_size(
    model: nn.Module,
    forward: LabelForward,
    sample_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    samples: int | None = None,
) -> int:
    """The cached or freshly tuned batch size for ``model`` on inputs ``(*, *sample_shape)``.

    ``samples``: the size of the call that asks (noisy samples), if known: a small first call
    is not made to wait for a long tuning (``JOB_SHARE``); the answer is cached all the same.
    Must be called with the model in ``eval()`` and under ``torch.inference_mode()`` (as the
    sampler does), so that tuning leaves the model's state untouched.
    """
    device = torch.device(device)
    key = (tuple(sample_shape), dtype, _device_key(device), forward.key)
    sizes = _CACHE.setdefault(model, {})
    if key not in sizes:
        candidates = GPU_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES
        sizes[key] = tune_batch_size(
            forward, model, sample_shape, dtype, device, candidates, samples
        )
    return sizes[key]


def tune_batch_size(
    forward: LabelForward,
    model: nn.Module,
    sample_shape: tuple,
    dtype: torch.dtype,
    device: torch.device,
    candidates: tuple[int, ...],
    samples: int | None = None,
) -> int:
    """Time ``forward`` on growing batch sizes and return the one with the best throughput.

    Growth stops after ``PATIENCE`` candidates in a row that are not ``GAIN`` times faster
    than the best so far (never on a GPU: ``GPU_PATIENCE``), once one forward pass takes
    ``SLOW_FORWARD_S``, after ``TIME_BUDGET_S``, when the next candidate would exceed the CPU
    memory budget, or at the first CUDA out-of-memory error (a slow model's sizes up to
    ``SLOW_FORWARD_S`` thus all get timed). Then the ``CONTENDERS`` best are timed again in
    ``EXTRA_ROUNDS`` round-robin rounds (until ``RETIME_BUDGET_S`` of timing in all) and the
    one with the best median over its timings wins (with ``samples``, both budgets shrink to
    ``JOB_SHARE`` of the call's time, at least ``MIN_BUDGET_S``), so that a burst of load from
    other processes, a drifting VM or one lucky timing is less likely to decide.
    """
    rates: dict[int, float] = {}  # batch size -> samples per second
    misses, spent = 0, 0.0
    limit = _cpu_sample_limit(model, forward, sample_shape, dtype) if device.type == "cpu" else 0
    patience = PATIENCE if device.type == "cpu" else GPU_PATIENCE
    for size in candidates:
        if limit and size > max(limit, candidates[0]):
            break
        try:
            seconds, charged = _time_forward(forward, size, sample_shape, dtype, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best = max(rates.values(), default=0.0)
        rates[size], spent = size / seconds, spent + charged
        misses = 0 if rates[size] > best * GAIN else misses + 1
        budget = _budget(TIME_BUDGET_S, samples, max(rates.values()))
        if misses >= patience or seconds >= SLOW_FORWARD_S or spent >= budget:
            break
    # A busy machine, or a VM whose speed drifts, can spoil a timing: time the best again,
    # round-robin, so that each is timed at several moments.
    contenders = sorted(rates, key=rates.get)[-CONTENDERS:] if len(rates) > 1 else []
    rounds = {size: [rates[size]] for size in contenders}  # samples per second, per timing
    budget = _budget(RETIME_BUDGET_S, samples, max(rates.values(), default=0.0))
    for _ in range(EXTRA_ROUNDS):
        for size in contenders:
            if spent >= budget:
                break
            seconds, charged = _time_forward(
                forward, size, sample_shape, dtype, device, warm_up=False
            )
            rounds[size].append(size / seconds)
            spent += charged
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if contenders:  # the median timing: one lucky timing (seen: +40 %) must not decide
        return max(contenders, key=lambda size: statistics.median(rounds[size]))
    return max(rates, key=rates.get) if rates else candidates[0]


def _budget(limit: float, samples: int | None, rate: float) -> float:
    """``limit``, or less for a call of ``samples`` samples (``JOB_SHARE``, ``MIN_BUDGET_S``)."""
    if samples is None or rate <= 0:
        return limit
    return min(limit, max(MIN_BUDGET_S, JOB_SHARE * samples / rate))


def _time_forward(
    forward, size, sample_shape, dtype, device, warm_up: bool = True
) -> tuple[float, float]:
    """Median of a few timed forward passes on a ``(size, *sample_shape)`` dummy batch.

    The median, not the fastest pass: on a CPU a lucky single pass of a large batch can run
    far above the rate that batch sustains (seen: 1.6x), which the sampler never gets.
    Returns ``(median pass, time charged to the tuning budget)``; the warm-up passes are
    charged as two passes at most (``torch.compile`` compiling a new shape is not charged).
    """
    # A private generator: tuning must not move the global RNG (exact training resume).
    generator = torch.Generator(device=device).manual_seed(0)
    batch = forward.empty(size, sample_shape, dtype, device).uniform_(generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = 0.0
    for _ in range(WARM_UP if warm_up else 0):  # lazy initialisation, compilation, allocator
        start = time.perf_counter()
        forward.labels(batch)
        sync()
        warm = max(warm, time.perf_counter() - start)
    passes: list[float] = []
    while len(passes) < MIN_REPEATS or (sum(passes) < MIN_TIME_S and len(passes) < MAX_REPEATS):
        start = time.perf_counter()
        forward.labels(batch)
        sync()  # the GPU has finished before the clock stops
        passes.append(time.perf_counter() - start)
    median = statistics.median(passes)
    return median, sum(passes) + min(WARM_UP * warm, 2 * median)


def _cpu_sample_limit(model, forward, sample_shape, dtype) -> int:
    """Largest CPU batch whose inputs and (estimated) activations fit the memory budget."""
    biggest = [0]

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            biggest[0] = max(biggest[0], output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        probe = forward.empty(2, sample_shape, dtype, "cpu")  # (2, *shape), zeros
        forward.labels(probe)
    finally:
        for handle in handles:
            handle.remove()
    per_sample = probe[0].numel() * probe.element_size() + 4 * biggest[0] // 2
    return max(1, int(_cpu_budget() // per_sample))


def _cpu_budget() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return CPU_MEMORY_CAP
    return min(CPU_MEMORY_CAP, CPU_MEMORY_FRACTION * available)
