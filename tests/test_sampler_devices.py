"""The sampler on every device this machine has: the CPU always, CUDA where there is one.

CI has no GPU, so the CUDA cases run where one is (``pytest tests/test_sampler_devices.py`` on
a GPU machine; ``benchmarks/gpu_check.sh`` runs them with the GPU benchmarks).
"""

import pytest
import torch
from scipy.stats import norm
from torch import nn

from certify import SmoothedClassifier
from certify.sampling.noise import noise_chunk

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


class Threshold(nn.Module):
    """Label 1 when the first pixel exceeds ``t``, else 0 (2 classes)."""

    def __init__(self, t: float):
        super().__init__()
        self.t = t
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x):
        first = x.flatten(1)[:, 0] - self.t  # (B,)
        return torch.stack([torch.zeros_like(first), first], dim=1) + self.anchor  # (B, 2)


def cnn(device, channels=3):
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 5),
        )
        .to(device)
        .eval()
    )


@pytest.mark.parametrize("device", DEVICES)
def test_noise_has_the_stated_distribution(device):
    # P(x0 + sigma * z > t) = Phi((x0 - t) / sigma): the counts must match it.
    sigma, n = 0.5, 200_000
    x = torch.tensor([[0.5, 0.1], [0.5, 0.9], [0.2, 0.3]], device=device)  # (3, 2)
    smoothed = SmoothedClassifier(Threshold(0.6).to(device), num_classes=2, sigma=sigma)
    counts = smoothed.sample_counts(x, n, seed=11).cpu()  # (3, 2)
    p = torch.tensor(norm.sf((0.6 - x[:, 0].cpu().double().numpy()) / sigma))  # (3,)
    z = (counts[:, 1] - n * p) / torch.sqrt(n * p * (1 - p))
    assert z.abs().max() < 4.5, z  # a false alarm once in 10^5 runs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_counts_do_not_depend_on_the_batch_size(device, channels_last):
    smoothed = SmoothedClassifier(cnn(device), 5, 0.25, channels_last=channels_last)
    x, ids = torch.rand(3, 3, 8, 8, device=device), [4, 0, 9]
    n = 3 * noise_chunk(device, (3, 8, 8)) + 77  # full chunks and a short one
    reference = smoothed.sample_counts(x, n, batch_size=n, seed=5, example_ids=ids)
    assert reference.device.type == torch.device(device).type
    for size in (100, 1000, 4096 + 3, None):
        again = smoothed.sample_counts(x, n, batch_size=size, seed=5, example_ids=ids)
        torch.testing.assert_close(again, reference, rtol=0, atol=0)
    alone = smoothed.sample_counts(x[1:2], n, batch_size=1000, seed=5, example_ids=ids[1:2])
    torch.testing.assert_close(alone, reference[1:2], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compiled_cuda_graphs_match_eager_counts_and_memory_does_not_grow_with_n():
    """``compile="reduce-overhead"`` (CUDA graphs): the eager counts up to the rare label that
    fused kernels' rounding flips; batch-size invariant; memory one batch whatever n."""
    device = torch.device("cuda")
    model = cnn(device)
    x = torch.rand(4, 3, 8, 8, device=device)
    eager = SmoothedClassifier(model, 5, 0.25).sample_counts(x, 30_000, 4096, seed=3)
    graphs = SmoothedClassifier(model, 5, 0.25, compile="reduce-overhead")
    compiled = graphs.sample_counts(x, 30_000, 4096, seed=3)
    assert (compiled - eager).abs().sum() <= 30, (compiled, eager)
    again = graphs.sample_counts(x, 30_000, 8192, seed=3)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    peaks = []
    for n in (10_000, 100_000):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        SmoothedClassifier(model, 5, 0.25).sample_counts(x, n, 4096, seed=3)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    batch_bytes = 4096 * 3 * 8 * 8 * 4
    assert peaks[1] <= peaks[0] * 1.05 + 2**20, peaks  # independent of n
    assert peaks[1] < 16 * batch_bytes, (peaks, batch_bytes)  # a batch and its activations
