"""SmoothedClassifier: Monte Carlo counts, reproducibility, CERTIFY and PREDICT."""

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from certify import SmoothedClassifier, certified_radius, top_k_set
from certify.math.validation import UsageError
from certify.sampling.noise import (
    NOISE_CHUNK,
    PURPOSES,
    chunk_seed,
    chunk_seeds,
    mix64,
    seed_of_chunk,
    stream_seed,
)


class Constant(nn.Module):
    """Always predicts ``label``."""

    def __init__(self, label: int, num_classes: int):
        super().__init__()
        self.register_buffer(
            "scores", torch.nn.functional.one_hot(torch.tensor(label), num_classes).float()
        )

    def forward(self, x):
        return self.scores.expand(x.shape[0], -1)


class HalfSpace(nn.Module):
    """Label 1 when w.x > b else 0: its smoothed P(1) is Phi((w.x - b) / (sigma |w|))."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w)
        self.b = b

    def forward(self, x):
        margin = x.flatten(1) @ self.w - self.b  # (B,)
        return torch.stack([-margin, margin], dim=1)


def small_cnn(num_classes=5, channels=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, num_classes),
    ).eval()


def test_constant_model_counts():
    smoothed = SmoothedClassifier(Constant(3, 5), num_classes=5, sigma=0.5)
    counts = smoothed.sample_counts(torch.rand(4, 1, 8, 8), n=777, batch_size=100)
    assert counts.dtype == torch.int64 and counts.shape == (4, 5)
    assert (counts[:, 3] == 777).all() and counts.sum() == 4 * 777


def test_half_space_matches_its_closed_form():
    torch.manual_seed(0)
    w = torch.randn(16, dtype=torch.float64)
    x = torch.rand(6, 16, dtype=torch.float64)
    sigma, n = 0.5, 20_000
    b = float((x @ w).median())
    smoothed = SmoothedClassifier(HalfSpace(w, b), num_classes=2, sigma=sigma)
    counts = smoothed.sample_counts(x, n=n, seed=1).numpy()
    p1 = norm.cdf(((x @ w - b) / (sigma * w.norm())).numpy())
    stderr = np.sqrt(p1 * (1 - p1) / n)
    assert np.all(np.abs(counts[:, 1] / n - p1) < 5 * stderr + 1e-12)


@pytest.mark.parametrize("channels", [1, 3])
def test_counts_depend_only_on_seed_id_purpose_and_sample_index(channels):
    """The noise-stream property: any batch size, any other inputs in the call, and rounds
    ``[0, a) + [a, b)`` give the counts of one call ``[0, b)``; the seed matters."""
    model = small_cnn(channels=channels)
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5)
    x, ids, n = torch.rand(7, channels, 8, 8), [10, 11, 12, 13, 14, 15, 16], 300
    reference = smoothed.sample_counts(x, n, batch_size=1000, seed=42, example_ids=ids)
    assert reference.sum(dim=1).tolist() == [n] * 7
    for batch_size in (50, 128, 300, 2100, None):  # below, at and above one chunk
        again = smoothed.sample_counts(x, n, batch_size=batch_size, seed=42, example_ids=ids)
        torch.testing.assert_close(again, reference, rtol=0, atol=0)
    subset = [5, 2]  # each input alone, or in other company, gets the same counts
    alone = smoothed.sample_counts(x[subset], n, seed=42, example_ids=[ids[i] for i in subset])
    torch.testing.assert_close(alone, reference[subset], rtol=0, atol=0)
    rounds = [  # [0, 128) + [128, 256) + [256, 300)
        smoothed.sample_counts(x, m, batch_size=50, seed=42, example_ids=ids, start=start)
        for start, m in ((0, 128), (128, 128), (256, 44))
    ]
    torch.testing.assert_close(sum(rounds), reference, rtol=0, atol=0)
    other = smoothed.sample_counts(x[[2]], n, seed=43, example_ids=[ids[2]])
    assert not torch.equal(other, reference[[2]])  # the seed matters


def loop_counts(model, x, ids, n, sigma, seed_of) -> torch.Tensor:
    """Counts from a naive loop: chunk j of input ``ids[b]`` is torch's ``normal_`` from a
    generator seeded by ``seed_of(ids[b], j)``."""
    c = model[-1].out_features
    counts = torch.zeros(x.shape[0], c, dtype=torch.int64)
    generator = torch.Generator()
    for b, example_id in enumerate(ids):
        for j, start in enumerate(range(0, n, NOISE_CHUNK)):
            generator.manual_seed(seed_of(example_id, j))
            length = min(NOISE_CHUNK, n - start)
            noise = torch.empty(length, *x.shape[1:]).normal_(0.0, sigma, generator=generator)
            with torch.inference_mode():
                counts[b] += torch.bincount(
                    model(noise + x[b]).argmax(1), minlength=counts.shape[1]
                )
    return counts


@pytest.mark.parametrize("purpose", list(PURPOSES))
@pytest.mark.parametrize("start", [0, 2 * NOISE_CHUNK])
def test_counts_are_those_of_the_documented_noise_streams(purpose, start):
    """Chunk j of input ``id`` is torch's ``normal_`` from a generator seeded by
    ``chunk_seed(seed, id, j, purpose)``: a loop that draws each chunk on its own gets the
    same counts, and another purpose's streams give other counts."""
    model = small_cnn()
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5)
    x, ids, n, seed, first = torch.rand(3, 1, 8, 8), [4, 9, 1], 300, 11, start // NOISE_CHUNK
    expected = loop_counts(
        model, x, ids, n, 0.5, lambda i, j: chunk_seed(seed, i, first + j, purpose)
    )
    for batch_size in (50, 1000):
        counts = smoothed.sample_counts(x, n, batch_size, seed, ids, purpose, start)
        torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    for other in set(PURPOSES) - {purpose}:  # unrelated noise for another purpose
        assert not torch.equal(smoothed.sample_counts(x, n, 1000, seed, ids, other, start), counts)
    seeds = {chunk_seed(seed, 4, 0, p) for p in PURPOSES}
    assert len(seeds) == len(PURPOSES)


def test_chunks_of_one_input_never_share_the_generators_32_bit_seed():
    """torch's CPU generator keeps only the low 32 bits of its seed. Under seed 0, input
    81,374's chunks 9 and 92 have first-choice seeds that agree there, so they would draw the
    same noise; chunk 92 is re-seeded with ``mix64(s) >> 1``, and the sampler follows."""
    stream, ids, n = stream_seed(0, 81_374), [81_374], 93 * NOISE_CHUNK
    first = [seed_of_chunk(stream, j) for j in range(93)]
    assert first[9] != first[92] and first[9] % 2**32 == first[92] % 2**32
    draws = [torch.randn(64, generator=torch.Generator().manual_seed(first[j])) for j in (9, 92)]
    assert torch.equal(*draws)  # what the rule prevents
    seeds = chunk_seeds([stream], 93)[0].tolist()  # (93,)
    assert seeds == first[:92] + [mix64(first[92]) >> 1]
    assert len({s % 2**32 for s in seeds}) == 93
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 5)).eval()
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=1.0)
    x = torch.zeros(1, 1, 1, 3)
    counts = smoothed.sample_counts(x, n, seed=0, example_ids=ids)
    expected = loop_counts(model, x, ids, n, 1.0, lambda i, j: chunk_seed(0, i, j))
    torch.testing.assert_close(counts, expected, rtol=0, atol=0)
    assert not torch.equal(counts, loop_counts(model, x, ids, n, 1.0, lambda i, j: first[j]))


def test_unseeded_sampling_follows_torch_manual_seed():
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=1.0)
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(5)
    first = smoothed.sample_counts(x, n=500)
    torch.manual_seed(5)
    assert torch.equal(first, smoothed.sample_counts(x, n=500))
    assert not torch.equal(first, smoothed.sample_counts(x, n=500))


@pytest.mark.parametrize("batch_size", [None, 16])
def test_model_mode_batchnorm_and_global_rng_are_untouched(batch_size):
    model = small_cnn().train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 8, 8).requires_grad_()
    rng = torch.get_rng_state()
    smoothed = SmoothedClassifier(model, num_classes=5, sigma=0.5)
    smoothed.sample_counts(x, 50, batch_size, seed=3)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key


def test_certify_equals_counts_then_radius():
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.25)
    x, labels = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    radii = smoothed.certify(x, labels, (1, 2), n=400, alpha=0.01, seed=7)
    counts = smoothed.sample_counts(x, n=400, seed=7)
    expected = certified_radius(counts, labels, (1, 2), 0.25, 0.01)
    torch.testing.assert_close(radii, expected, equal_nan=True, rtol=0, atol=0)
    assert radii.dtype == torch.float64 and radii.shape == (5, 2)


def test_predict_returns_the_true_top_k_of_a_clear_model():
    smoothed = SmoothedClassifier(Constant(2, 4), num_classes=4, sigma=0.5)
    top = smoothed.predict(torch.rand(3, 1, 8, 8), k=1, n=200, alpha=0.001)
    assert top.tolist() == [[2], [2], [2]]
    # With k = 2 the runner-up is not separated from the others (all have 0 counts): abstain.
    assert (smoothed.predict(torch.rand(1, 1, 8, 8), k=2, n=200, alpha=0.001) == -1).all()


def hard_multinomial(k: int, gap: float, c: int = 6) -> np.ndarray:
    """c labels whose k-th and (k+1)-th probabilities differ by ``gap``."""
    p = np.linspace(0.3, 0.05, c)
    p[k - 1], p[k] = 0.5 * (p[k - 1] + p[k]) + gap / 2, 0.5 * (p[k - 1] + p[k]) - gap / 2
    return p / p.sum()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_predict_wrong_set_rate_is_at_most_alpha(k):
    """Near ties at the k-th place: wrong sets are tempting, the rule must resist them.

    An unsound rule (return the k most frequent labels) is wrong far more often than alpha
    here; the simultaneous-bounds rule must stay at or below alpha while still answering.
    """
    rng = np.random.default_rng(k)
    alpha, trials = 0.1, 1500
    wrong = answered = naive_wrong = 0
    for gap in (0.0, 0.004, 0.015, 0.04, 0.08):
        p = hard_multinomial(k, gap)
        true_top = set(np.argsort(-p, kind="stable")[:k].tolist())
        counts = torch.from_numpy(rng.multinomial(4000, p, size=trials))
        sets = top_k_set(counts, k, alpha).numpy()
        said = sets[:, 0] >= 0
        answered += said.sum()
        wrong += sum(set(s.tolist()) != true_top for s in sets[said])
        naive = np.argsort(-counts.numpy(), axis=1, kind="stable")[:, :k]
        naive_wrong += sum(set(s.tolist()) != true_top for s in naive)
    total = 5 * trials
    assert wrong / total <= alpha
    assert answered / total > 0.25  # it does answer, so the check has teeth
    assert naive_wrong / total > 1.2 * alpha  # the near ties make an unsound rule fail often


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: s.sample_counts(torch.rand(8), n=10), r"shape \(B"),
        (
            lambda s: s.sample_counts(torch.ones(2, 1, 8, 8, dtype=torch.int64), n=10),
            "floating-point",
        ),
        (lambda s: s.sample_counts(torch.full((1, 1, 8, 8), float("nan")), n=10), "NaN"),
        (lambda s: s.sample_counts(torch.full((1, 1, 8, 8), float("inf")), n=10), "infinite"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), n=0), "n must be"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), n=5, batch_size=0), "batch_size"),
        (lambda s: s.sample_counts(torch.rand(2, 1, 8, 8), n=5, example_ids=[1]), "example_ids"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, example_ids=[-1]), r"got \[-1\]"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, example_ids=[1.0]), "got \\[1.0"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, seed=-1), "got -1"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, purpose="train"), "'train'"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, start=100), "got 100"),
        (lambda s: s.sample_counts(torch.rand(1, 1, 8, 8), 5, start=-128), "got -128"),
        (lambda s: s.predict_certified(torch.rand(1, 1, 8, 8), 1, 0, 5, 0.1), "n0 must"),
        (lambda s: s.certify(torch.rand(1, 1, 8, 8), [0], 1, 5, 0.1, bounds="x"), "'x'"),
        (lambda s: s.certify(torch.rand(2, 1, 8, 8), torch.tensor([0, 5]), 1, 10, 0.1), "labels"),
        (lambda s: s.certify(torch.rand(2, 1, 8, 8), torch.tensor([0]), 1, 10, 0.1), "shape"),
        (lambda s: s.certify(torch.rand(1, 1, 8, 8), torch.tensor([0]), 5, 10, 0.1), "k must"),
        (lambda s: s.predict(torch.rand(1, 1, 8, 8), 1, 10, alpha=2.0), "alpha"),
        (lambda s: top_k_set(torch.tensor([[900, 50, 50, 0]]), -1, 0.001), "got k = -1"),
        (lambda s: top_k_set(torch.tensor([[900, 50, 50, 0]]), 4, 0.001), "got k = 4"),
        (lambda s: top_k_set(torch.tensor([[900, 50, 50, 0]]), True, 0.001), "got True"),
        (lambda s: top_k_set(torch.tensor([[9.0, 1.0]]), 1, 0.001), "integers"),
    ],
)
def test_bad_input_is_rejected(call, match):
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    with pytest.raises((UsageError, ValueError), match=match):
        call(smoothed)


def test_bad_construction():
    with pytest.raises(UsageError, match="got -1"):
        SmoothedClassifier(small_cnn(), num_classes=5, sigma=-1)
    with pytest.raises(UsageError, match="mode=fastest"):
        SmoothedClassifier(small_cnn(), num_classes=5, sigma=1, compile="fastest")
    with pytest.raises(UsageError, match="num_classes"):
        SmoothedClassifier(small_cnn(), num_classes=1, sigma=1)


def test_wrong_model_output_is_named():
    smoothed = SmoothedClassifier(small_cnn(num_classes=3), num_classes=5, sigma=0.5)
    with pytest.raises(UsageError, match=r"expected \(batch, 5\)"):
        smoothed.sample_counts(torch.rand(1, 1, 8, 8), n=4)
