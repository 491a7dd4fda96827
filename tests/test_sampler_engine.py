"""The sampling loop and its options: batches, one buffer, the automatic batch size, dtypes."""

import pytest
import torch
from torch import nn

from certify import SmoothedClassifier
from certify.sampling import smoothing
from certify.sampling.noise import NOISE_CHUNK, noise_chunk


def small_cnn(num_classes=5, channels=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, num_classes),
    ).eval()


class Recorder(nn.Module):
    """Wraps a model and records the batches it sees."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(x)
        return self.model(x)


@pytest.mark.parametrize(
    ("inputs", "n", "batch_size"),
    [(3, 1000, 256), (3, 300, 1000), (3, 77, 16), (8, 129, 100), (1, 1025, 512), (2, 300, 600)],
)
def test_every_sample_is_counted_once_in_full_batches_from_one_buffer(inputs, n, batch_size):
    model = Recorder(small_cnn())
    counts = SmoothedClassifier(model, 5, 0.5).sample_counts(
        torch.rand(inputs, 1, 8, 8), n=n, batch_size=batch_size, seed=0
    )
    assert counts.sum(dim=1).tolist() == [n] * inputs
    sizes = [batch.shape[0] for batch in model.batches]
    batch_size = min(batch_size, inputs * n)  # no batch beyond the call's samples
    assert sum(sizes) == inputs * n  # every noisy sample classified once ...
    assert all(size == batch_size for size in sizes[:-1]) and sizes[-1] <= batch_size  # full
    # ... from one buffer whatever n is: a batch and less than one chunk more.
    storages = {batch.untyped_storage().data_ptr() for batch in model.batches}
    rows = model.batches[0].untyped_storage().nbytes() // (64 * 4)
    assert len(storages) == 1 and rows <= batch_size + NOISE_CHUNK - 1


def test_noise_chunk_depends_on_device_type_and_input_size_only():
    assert {noise_chunk("cpu", shape) for shape in [(1, 8, 8), (3, 224, 224)]} == {NOISE_CHUNK}
    assert noise_chunk("cuda", (1, 8, 8)) == 4096  # 1 MiB of float32 noise
    assert noise_chunk("cuda:1", (3, 32, 32)) == 2048  # 24 MiB
    assert noise_chunk("cuda", (3, 224, 224)) == NOISE_CHUNK  # never shorter than on a CPU


def test_auto_batch_size_follows_the_memory_rule_once_and_gives_the_same_counts(monkeypatch):
    model = Recorder(small_cnn())
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5)
    per_sample = 8 * 8 * 4 + smoothing.ACTIVATIONS * 8 * 8 * 8 * 4  # input + conv output
    expected = min(smoothing.MAX_BATCH[0], smoothing.CPU_BATCH_BYTES // per_sample)
    chosen = smoothed.auto_batch_size((1, 8, 8))
    assert chosen == 1 << (expected.bit_length() - 1)
    assert [tuple(b.shape) for b in model.batches] == [(2, 1, 8, 8)]  # one probe, no timing
    x, ids = torch.rand(4, 1, 8, 8), [9, 3, 7, 1]
    auto = smoothed.sample_counts(x, n=700, seed=3, example_ids=ids)
    sizes = [b.shape[0] for b in model.batches[1:]]  # kept: no second probe
    assert sizes == [chosen] * (2800 // chosen) + [2800 % chosen] * (2800 % chosen > 0)
    for size in (64, 200):
        explicit = smoothed.sample_counts(x, n=700, batch_size=size, seed=3, example_ids=ids)
        torch.testing.assert_close(explicit, auto, rtol=0, atol=0)
    monkeypatch.setattr(smoothing, "CPU_BATCH_BYTES", 40 * per_sample)  # 40 samples fit
    fresh = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    assert fresh.auto_batch_size((1, 8, 8)) == 32
    double = SmoothedClassifier(small_cnn().double(), num_classes=5, sigma=0.5)
    assert double.auto_batch_size((1, 8, 8), torch.float64) == 16  # twice the bytes


def test_choosing_the_batch_size_leaves_the_model_and_rng_untouched():
    model = small_cnn().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    SmoothedClassifier(model, num_classes=5, sigma=0.5).auto_batch_size((1, 8, 8))
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize(
    ("options", "channels", "dtype", "seen"),
    [
        ({"channels_last": True}, 3, torch.float32, torch.float32),
        ({"autocast_dtype": torch.bfloat16}, 1, torch.float32, torch.float32),
        ({}, 1, torch.float64, torch.float64),
    ],
)
def test_options_are_reproducible_and_batch_size_invariant(options, channels, dtype, seen):
    """Channels-last batches, bf16 autocast (float32 noise) and float64 inputs (float64
    noise): counts reproducible and the same for every batch size."""
    model = Recorder(small_cnn(channels=channels).to(dtype))
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5, **options)
    x = torch.rand(3, channels, 8, 8, dtype=dtype)
    smoothed.auto_batch_size(x.shape[1:], dtype)
    model.batches.clear()  # the probe of the automatic batch size
    reference = smoothed.sample_counts(x, n=500, batch_size=64, seed=1)
    assert reference.sum(dim=1).tolist() == [500] * 3
    for size in (64, 300, None):
        again = smoothed.sample_counts(x, n=500, batch_size=size, seed=1)
        torch.testing.assert_close(again, reference, rtol=0, atol=0)
    assert {batch.dtype for batch in model.batches} == {seen}  # the noisy samples' dtype
    if options.get("channels_last"):
        assert all(b.is_contiguous(memory_format=torch.channels_last) for b in model.batches)
    if options:  # the option changes the noise layout or the numerics, not the counts' sum
        plain = SmoothedClassifier(small_cnn(channels=channels), 5, 0.5).sample_counts(
            x.float(), n=500, batch_size=64, seed=1
        )
        assert plain.sum() == reference.sum()


@pytest.mark.slow
def test_compiled_model_counts_like_the_eager_one_at_any_batch_size():
    """``compile=True`` (inductor on the CPU, several seconds to compile): the same labels as
    the eager model here, so the same counts, and the same for a batch size whose last batch
    is shorter (a second, dynamic-shape compilation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()  # quick to compile
    x = torch.rand(3, 1, 8, 8)
    eager = SmoothedClassifier(model, 5, 0.5).sample_counts(x, n=300, batch_size=256, seed=2)
    compiled = SmoothedClassifier(model, 5, 0.5, compile=True)
    for size in (256, 300):
        counts = compiled.sample_counts(x, n=300, batch_size=size, seed=2)
        torch.testing.assert_close(counts, eager, rtol=0, atol=0)
