"""The sampler's engine: automatic batch size, its cache, the memory bound and the options."""

import gc
from functools import partial

import pytest
import torch
from torch import nn

from certify import SmoothedClassifier
from certify.sampling import batching
from certify.sampling.noise import NOISE_CHUNK, noise_chunk
from certify.sampling.packing import capacity, plan


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
        self.model, self.shapes, self.dtypes, self.channels_last = model, [], [], []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        self.dtypes.append(x.dtype)
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last))
        return self.model(x)


@pytest.fixture(autouse=True)
def fast_tuning(tuning):
    """Few, quick candidates and an empty cache in every test."""
    tuning(CPU_CANDIDATES=(16, 32, 64, 128), MIN_TIME_S=0.0, WARM_UP=1, MIN_REPEATS=1)


@pytest.fixture
def tunings(monkeypatch):
    """Counts the calls of the tuner."""
    calls = []
    tune = batching.tune_batch_size

    def counted(*args, **kwargs):
        calls.append(args[2])
        return tune(*args, **kwargs)

    monkeypatch.setattr(batching, "tune_batch_size", counted)
    return calls


def test_auto_batch_size_gives_the_counts_of_explicit_sizes(tunings):
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    x, ids = torch.rand(4, 1, 8, 8), [9, 3, 7, 1]
    auto = smoothed.sample_counts(x, n=700, seed=3, example_ids=ids)
    chosen = smoothed.auto_batch_size((1, 8, 8))
    assert chosen in batching.CPU_CANDIDATES and len(tunings) == 1
    for size in (64, 200, 512):
        explicit = smoothed.sample_counts(x, n=700, batch_size=size, seed=3, example_ids=ids)
        torch.testing.assert_close(explicit, auto, rtol=0, atol=0)


def test_tuning_is_cached_per_model_and_shape(tunings):
    model = small_cnn()
    first = SmoothedClassifier(model, num_classes=5, sigma=0.5)
    first.sample_counts(torch.rand(2, 1, 8, 8), n=50)
    first.sample_counts(torch.rand(3, 1, 8, 8), n=60)
    SmoothedClassifier(model, num_classes=5, sigma=0.25).sample_counts(torch.rand(1, 1, 8, 8), 9)
    assert len(tunings) == 1  # the same model and input shape: a cache hit
    (key,) = batching.cached_batch_sizes(model)
    assert key[:3] == ((1, 8, 8), torch.float32, "cpu")
    first.sample_counts(torch.rand(2, 1, 8, 8), n=50, batch_size=32)
    assert len(tunings) == 1  # an explicit batch size never tunes
    SmoothedClassifier(model.double(), 5, 0.5).sample_counts(torch.rand(1, 1, 8, 8).double(), 5)
    assert len(tunings) == 2  # another dtype: tuned again


def test_the_cache_does_not_keep_models_alive():
    model = small_cnn()
    SmoothedClassifier(model, num_classes=5, sigma=0.5).auto_batch_size((1, 8, 8))
    assert len(batching._CACHE) == 1
    del model
    gc.collect()
    assert len(batching._CACHE) == 0


def test_tuning_leaves_the_model_untouched():
    model = small_cnn().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    SmoothedClassifier(model, num_classes=5, sigma=0.5).auto_batch_size((1, 8, 8))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize(("n", "batch_size"), [(1000, 256), (2000, 64), (300, 1000), (77, 16)])
def test_noisy_inputs_never_exceed_one_batch(n, batch_size, monkeypatch):
    buffers = []
    make = batching.LabelForward.empty

    def recorded(self, rows, *args):
        buffers.append(rows)
        return make(self, rows, *args)

    monkeypatch.setattr(batching.LabelForward, "empty", recorded)
    model = Recorder(small_cnn())
    counts = SmoothedClassifier(model, 5, 0.5).sample_counts(
        torch.rand(3, 1, 8, 8), n=n, batch_size=batch_size, seed=0
    )
    assert counts.sum(dim=1).tolist() == [n] * 3
    # One buffer, whatever n is: a batch (plus one chunk when the batch is smaller), and no
    # batch larger than the call's 3 * n samples.
    batch_size = min(batch_size, 3 * n)
    assert buffers == [capacity(batch_size, NOISE_CHUNK)]
    assert capacity(batch_size, NOISE_CHUNK) == (
        batch_size if batch_size >= NOISE_CHUNK else batch_size + NOISE_CHUNK
    )
    assert max(shape[0] for shape in model.shapes) <= batch_size


def simulate(inputs, n, batch_size, chunk=NOISE_CHUNK):
    """Run a packing plan on a buffer of (input, sample) labels; return the forward sizes."""
    rows = capacity(batch_size, chunk)
    buffer, seen, sizes = [None] * rows, [], []
    for ops in plan(inputs, n, batch_size, chunk):
        sizes.append([])
        for op in ops:
            if op[0] == "noise":
                _, b, j, length, row = op
                assert 0 <= row and row + length <= rows
                buffer[row : row + length] = [(b, j * chunk + i) for i in range(length)]
            elif op[0] == "copy":
                _, src, dst, m = op
                assert src + m <= dst or dst + m <= src  # disjoint
                buffer[dst : dst + m] = buffer[src : src + m]
            else:
                _, lo, hi = op
                assert 0 <= lo < hi <= rows and hi - lo <= batch_size
                seen += buffer[lo:hi]
                buffer[lo:hi] = [None] * (hi - lo)  # each row is classified once
                sizes[-1].append(hi - lo)
    assert sorted(seen) == [(b, i) for b in range(inputs) for i in range(n)]
    return sizes


@pytest.mark.parametrize("n", [1, 77, 100, 128, 129, 300, 1000, 1025])
@pytest.mark.parametrize("batch_size", [1, 16, 100, 128, 200, 256, 300, 512, 1000, 4096])
def test_packing_classifies_every_sample_once_in_full_batches(n, batch_size):
    for inputs in (1, 3, 8):
        sizes = simulate(inputs, n, batch_size)
        if batch_size < NOISE_CHUNK or batch_size >= 2 * NOISE_CHUNK:
            # Every forward pass is a full batch, except those of the last refill.
            assert all(size == batch_size for refill in sizes[:-1] for size in refill)


@pytest.mark.parametrize("chunk", [2048, 4096])
@pytest.mark.parametrize("n", [100, 1000, 4097, 10_000])
@pytest.mark.parametrize("batch_size", [100, 1000, 4096, 8192, 65_536])
def test_packing_with_the_long_chunks_of_a_gpu(n, batch_size, chunk):
    for inputs in (1, 3, 8):
        sizes = simulate(inputs, n, batch_size, chunk)
        if batch_size < chunk or batch_size >= 2 * chunk:
            assert all(size == batch_size for refill in sizes[:-1] for size in refill)


def test_noise_chunk_depends_on_device_type_and_input_size_only():
    assert {noise_chunk("cpu", shape) for shape in [(1, 8, 8), (3, 224, 224)]} == {NOISE_CHUNK}
    assert noise_chunk("cuda", (1, 8, 8)) == 4096  # 1 MiB of float32 noise
    assert noise_chunk("cuda:1", (3, 32, 32)) == 2048  # 24 MiB
    assert noise_chunk("cuda", (3, 224, 224)) == NOISE_CHUNK  # never shorter than on a CPU


@pytest.mark.parametrize("chunk", [NOISE_CHUNK, 4096])
def test_counts_are_batch_size_invariant_whatever_the_chunk(chunk):
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    x, ids = torch.rand(3, 1, 8, 8), [5, 0, 2]

    def counts(batch_size):
        with torch.inference_mode():
            return smoothed._sample(x, 5000, batch_size, 7, ids, chunk)

    reference = counts(5000)
    assert reference.sum(dim=1).tolist() == [5000] * 3
    for size in (64, 1000, 4096, 8192):
        torch.testing.assert_close(counts(size), reference, rtol=0, atol=0)
    if chunk == NOISE_CHUNK:  # the sampler's own chunk on a CPU
        public = smoothed.sample_counts(x, 5000, batch_size=333, seed=7, example_ids=ids)
        torch.testing.assert_close(public, reference, rtol=0, atol=0)


def fake_timings(monkeypatch, seconds: dict[int, float]):
    """``tune_batch_size`` over ``seconds``' sizes on a fake clock (size -> ms per pass).

    Returns ``(tune(device) -> chosen size, the sizes timed so far)``.
    """
    timed = []

    def fake(forward, size, *args, **kwargs):
        timed.append(size)
        return seconds[size] / 1000, 0.0

    monkeypatch.setattr(batching, "_time_forward", fake)
    forward = batching.LabelForward(small_cnn(), 5)

    def tune(device: str) -> int:
        return batching.tune_batch_size(
            forward, forward.model, (1, 8, 8), torch.float32, torch.device(device), tuple(seconds)
        )

    return tune, timed


def test_tuner_stops_when_throughput_stops_improving(monkeypatch):
    seconds = {16: 1.0, 32: 1.0, 64: 1.2, 128: 2.6, 256: 5.0, 512: 10.0}  # best: 64
    tune, timed = fake_timings(monkeypatch, seconds)
    assert tune("cpu") == 64
    assert 512 not in timed  # two candidates without improvement end the search


def test_tuner_grows_through_flat_sizes_on_a_gpu(monkeypatch):
    # Flat from 16 to 512, then twice as fast at 1024 (an H200 ran ResNet-20 11 % faster at
    # 65,536 than at any size from 4,096 to 32,768); 4096 takes SLOW_FORWARD_S per pass.
    seconds = {16: 1.0, 32: 2.0, 64: 4.0, 128: 8.0, 256: 16.0, 512: 32.0, 1024: 32.0}
    seconds |= {2048: 400.0, 4096: 1000 * batching.SLOW_FORWARD_S, 8192: 4000.0}
    tune, timed = fake_timings(monkeypatch, seconds)
    assert tune("cpu") == 16  # two misses end the search
    timed.clear()
    assert tune("cuda") == 1024
    assert 4096 in timed and 8192 not in timed  # a pass of SLOW_FORWARD_S ends it


def test_a_small_first_call_gets_a_short_tuning(monkeypatch):
    timed = []

    def fake(forward, size, *args, **kwargs):  # ever faster, 0.25 s of timing per size
        timed.append(size)
        return size / (1000.0 * size**0.5), 0.25

    monkeypatch.setattr(batching, "_time_forward", fake)
    forward = batching.LabelForward(small_cnn(), 5)
    sizes = tuple(2**i for i in range(4, 14))
    tune = partial(batching.tune_batch_size, forward, forward.model, (1, 8, 8), torch.float32)
    assert tune(torch.device("cpu"), sizes) == sizes[-1]  # 10 s: every size, then re-timing
    assert len(timed) > len(sizes)
    timed.clear()
    # 200 samples take well under a second: tuning stops at MIN_BUDGET_S (1 s, 4 sizes).
    assert tune(torch.device("cpu"), sizes, samples=200) == 128
    assert timed == [16, 32, 64, 128]


def test_tuner_stops_at_out_of_memory_and_at_the_memory_budget(monkeypatch):
    def fake(forward, size, *args, **kwargs):
        if size >= 256:
            raise torch.cuda.OutOfMemoryError("fake")
        return size / 1e6 / (1 + size / 64), 0.0  # faster and faster

    monkeypatch.setattr(batching, "_time_forward", fake)
    forward = batching.LabelForward(small_cnn(), 5)
    candidates = (16, 32, 64, 128, 256, 512)
    cpu = torch.device("cpu")
    assert (
        batching.tune_batch_size(forward, forward.model, (1, 8, 8), torch.float32, cpu, candidates)
        == 128
    )
    per_sample = 8 * 8 * 4 + 4 * 8 * 8 * 8 * 4  # input + 4 x the largest activation (bytes)
    monkeypatch.setattr(batching, "_cpu_budget", lambda: 40 * per_sample)  # 40 samples fit
    assert (
        batching.tune_batch_size(forward, forward.model, (1, 8, 8), torch.float32, cpu, candidates)
        == 32
    )


def test_channels_last_is_reproducible_and_batch_size_invariant():
    model = Recorder(small_cnn(channels=3))
    model.model[-1] = nn.Linear(8 * 64, 5)
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5, channels_last=True)
    x = torch.rand(3, 3, 8, 8)
    reference = smoothed.sample_counts(x, n=500, batch_size=64, seed=1)
    assert all(model.channels_last)
    for size in (100, 1024, None):
        again = smoothed.sample_counts(x, n=500, batch_size=size, seed=1)
        torch.testing.assert_close(again, reference, rtol=0, atol=0)


def test_autocast_keeps_float32_noise_and_cuda_graphs_are_ignored_on_cpu():
    model = Recorder(small_cnn())
    x = torch.rand(2, 1, 8, 8)
    plain = SmoothedClassifier(model, 5, 0.5).sample_counts(x, n=300, batch_size=64, seed=2)
    graphs = SmoothedClassifier(model, 5, 0.5, cuda_graphs=True)
    torch.testing.assert_close(graphs.sample_counts(x, n=300, seed=2), plain, rtol=0, atol=0)
    model.dtypes.clear()
    bf16 = SmoothedClassifier(model, 5, 0.5, autocast_dtype=torch.bfloat16)
    assert bf16.sample_counts(x, n=300, batch_size=64, seed=2).sum() == 600
    assert set(model.dtypes) == {torch.float32}  # the model's input: float32 noisy samples
