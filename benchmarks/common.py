"""Shared pieces of the benchmarks: models, inputs, timing, the original-style baseline."""

from __future__ import annotations

import datetime
import functools
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import torch

from certify.sampling.batching import (
    CPU_CANDIDATES,
    GPU_CANDIDATES,
    LabelForward,
    _cpu_sample_limit,
)
from certify.sampling.noise import ChunkNoise, noise_chunk

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # as in datamodules/cifar10.py
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS = ((0.3053,), (0.3760,))  # as in datamodules/digits.py


@dataclass(frozen=True)
class ModelSpec:
    """A registry model with the input shape, classes and normalisation of its data set."""

    arch: str
    shape: tuple[int, ...]
    num_classes: int
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    gpu_only: bool = False

    def build(self) -> torch.nn.Module:
        from lightning_modules.models import build_network

        torch.manual_seed(0)
        return build_network(self.arch, self.num_classes, *self.norm)

    def inputs(self, count: int, device: torch.device) -> torch.Tensor:
        """``(count, *shape)`` inputs in [0, 1]: sklearn's digits, else seeded uniform noise."""
        if self.arch == "digits_cnn":
            from sklearn.datasets import load_digits

            images = torch.from_numpy(load_digits().images / 16.0).float()  # (1797, 8, 8)
            index = torch.arange(count) % images.shape[0]
            return images[index].unsqueeze(1).to(device)  # (count, 1, 8, 8)
        generator = torch.Generator().manual_seed(0)
        return torch.rand((count, *self.shape), generator=generator).to(device)


MODELS = {
    "digits_cnn": ModelSpec("digits_cnn", (1, 8, 8), 10, DIGITS),
    "cifar_resnet20": ModelSpec("cifar_resnet20", (3, 32, 32), 10, CIFAR10),
    "cifar_resnet110": ModelSpec("cifar_resnet110", (3, 32, 32), 10, CIFAR10),
    "resnet50": ModelSpec("resnet50", (3, 224, 224), 1000, IMAGENET, gpu_only=True),
}


def _busy_seconds() -> float:
    """CPU seconds spent by all processes (all cores) since boot, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_idle_fraction(window: float) -> float:
    start = _busy_seconds()
    time.sleep(window)
    return 1.0 - (_busy_seconds() - start) / (window * (os.cpu_count() or 1))


def wait_for_idle_cpu(max_wait: float, threshold: float = 0.85, window: float = 0.3) -> bool:
    """On a shared machine, wait up to ``max_wait`` s until other processes leave the CPUs idle.

    Returns whether the CPUs were idle (``False`` on timeout, or without ``/proc/stat``).
    """
    deadline = time.monotonic() + max_wait
    try:
        while _cpu_idle_fraction(window) < threshold:
            if time.monotonic() > deadline:
                return False
    except OSError:
        return False
    return True


class OtherLoad:
    """Context manager measuring the share of the CPUs that *other* processes used meanwhile.

    ``share`` is their CPU time over ``wall time x cores`` (0 on an otherwise idle machine;
    ``nan`` without ``/proc/stat``). This process's own threads are not counted.
    """

    share = float("nan")

    def __enter__(self):
        try:
            self._busy = _busy_seconds()
        except OSError:
            self._busy = None
        self._own, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._busy is not None:
            wall = time.perf_counter() - self._wall
            others = _busy_seconds() - self._busy - (time.process_time() - self._own)
            self.share = max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)
        return False


def clean_run(fn, device: torch.device, tries: int, idle_wait: float, limit: float = 0.1):
    """Run ``fn()`` until other processes used under ``limit`` of the CPUs meanwhile.

    On a GPU, once. Returns ``(best result, whether one run was clean)``; results are
    rates (larger is better) and every try waits for idle CPUs first.
    """
    best = -math.inf
    for _ in range(1 if device.type == "cuda" else max(1, tries)):
        if device.type == "cpu":
            wait_for_idle_cpu(idle_wait)
        with OtherLoad() as load:
            best = max(best, fn())
        if device.type == "cuda" or not load.share > limit:  # nan: cannot tell, accept
            return best, True
    return best, False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous), so that timings are true."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _noisy_batch(forward: LabelForward, size: int, x: torch.Tensor, sigma: float):
    batch = forward.empty(size, tuple(x.shape[1:]), torch.float32, x.device)  # (size, *shape)
    rows = torch.arange(size, device=x.device) % x.shape[0]  # (size,)
    return batch.copy_(x[rows] + sigma * torch.randn_like(x[rows]))


@torch.inference_mode()
def forward_rate(
    forward: LabelForward, size: int, x: torch.Tensor, seconds: float, sigma: float = 0.25
) -> float:
    """(a): noisy samples per second of forward + argmax on a pre-made batch of ``size``."""
    batch = _noisy_batch(forward, size, x, sigma)
    device = x.device
    forward.labels(batch)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    forward.labels(batch)
    synchronize(device)
    passes = max(2, math.ceil(seconds / (time.perf_counter() - start)))
    start = time.perf_counter()
    for _ in range(passes):
        forward.labels(batch)
    synchronize(device)
    return passes * size / (time.perf_counter() - start)


def sweep_forward(forward, model, shape, device, seconds: float, run=None) -> dict[int, float]:
    """(a) at every candidate batch size until 3 in a row do not beat the best (or OOM).

    ``run(fn)`` runs each measurement ``fn()`` and returns its rate (e.g. ``clean_run``'s).
    """
    candidates = GPU_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES
    if device.type == "cpu":
        with torch.inference_mode():
            limit = _cpu_sample_limit(model, forward, shape, torch.float32)
        candidates = [c for c in candidates if c <= max(limit, candidates[0])]
    x = torch.rand((1, *shape), device=device)
    slowest = 1.0 if device.type == "cuda" else 4.0  # seconds per pass: no larger size
    rates: dict[int, float] = {}
    misses = 0
    for size in candidates:
        measure = functools.partial(forward_rate, forward, size, x, seconds)
        try:
            rates[size] = run(measure) if run is not None else measure()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        misses = 0 if rates[size] >= max(rates.values()) else misses + 1
        if misses >= 3 or size / rates[size] > slowest:
            break
    return rates


@torch.no_grad()
def one_input_per_batch(model, x, n: int, batch_size: int, sigma: float, num_classes: int):
    """(c): the original implementations' loop (Cohen et al.'s ``Smooth._sample_noise``).

    One input per batch: repeat the image, add fresh noise, forward, argmax, copy the
    predictions to the host and count them there.
    """
    results = []
    for image in x:
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = n
        while remaining > 0:
            this = min(batch_size, remaining)
            remaining -= this
            batch = image.repeat((this, *[1] * image.ndim))  # (this, *shape)
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)  # (this,)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        results.append(counts)
    return np.stack(results)  # (B, c)


#: glibc's malloc settings that keep freed memory in the process (``docs/performance.md``).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
#: Any of these set by the user: the allocator is theirs, the benchmark leaves it alone.
MALLOC_VARIABLES = (*MALLOC_SETTINGS, "GLIBC_TUNABLES")


def malloc_settings() -> str:
    """glibc's malloc variables of this process, in words (``"glibc defaults"`` if none)."""
    found = [f"{name}={os.environ[name]}" for name in MALLOC_VARIABLES if name in os.environ]
    return " ".join(found) or "glibc defaults"


def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), or ``"unknown"``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def machine(device: torch.device) -> dict[str, str]:
    """What a measurement ran on: date, commit, CPU and cores, GPU, torch and Python versions,
    and on a CPU glibc's malloc settings."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cpu":
        info["malloc"] = malloc_settings()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@torch.inference_mode()
def noise_cost(
    forward: LabelForward, shape, batch: int, sigma: float, seconds: float = 10.0
) -> dict:
    """On a CPU, what drawing a batch's noise costs against the batch's forward pass.

    (a) runs on pre-made inputs; (b) also draws the noise (torch's ``normal_``, ``batch``
    samples in the sampler's chunks, each seeded, through its own ``ChunkNoise``). Noise and
    forward pass alternate, so a drift of the machine's speed hits both alike. Returns median
    milliseconds per batch: ``{"noise", "forward", "batch"}``.
    """
    chunk = noise_chunk("cpu", shape)
    chunks = max(1, batch // chunk)
    buffer = forward.buffer(chunks * chunk, shape, torch.float32, "cpu")
    draw = ChunkNoise(buffer, sigma, 0, range(chunks), chunks=1)
    times: dict[str, list[float]] = {"noise": [], "forward": []}
    start = time.perf_counter()
    while len(times["forward"]) < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for b in range(chunks):
            draw(b, 0, b * chunk, chunk)
        times["noise"].append(time.perf_counter() - t)
        t = time.perf_counter()
        forward.labels(buffer)
        times["forward"].append(time.perf_counter() - t)
    cost = {key: 1e3 * statistics.median(v) for key, v in times.items()}
    cost["batch"] = chunks * chunk
    return cost


def noise_line(cost: dict) -> str:
    return (
        f"noise per batch of {cost['batch']}: {cost['noise']:.2f} ms (torch's normal_), "
        f"forward pass {cost['forward']:.2f} ms: noise {100 * cost['noise'] / cost['forward']:.1f}"
        " % of it"
    )
