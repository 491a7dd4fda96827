"""Shared pieces of the benchmarks: the registry models with their inputs, the machine."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass

import torch

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
