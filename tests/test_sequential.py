"""Sequential certification: the schedule, the rounds of the sampler, the stopping rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import ndtri
from torch import nn

from certify import SmoothedClassifier, certified_radius, certify_sequential
from certify.math.sequential import DEFAULT_FIRST, _certify_rounds, look_schedule, spend
from certify.math.validation import UsageError
from certify.sampling.noise import NOISE_CHUNK


def multinomial_draw(p: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)

    def draw(m: int, active: torch.Tensor) -> torch.Tensor:
        counts = rng.multinomial(m, p, size=len(active))  # (B, c)
        return torch.from_numpy(counts * active.numpy()[:, None])

    return draw


def small_cnn(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, num_classes)
    ).eval()


# ----------------------------------------------------------------------- schedule and levels
def test_schedule_grows_geometrically_on_chunk_boundaries_and_ends_at_n_max():
    looks = look_schedule(100_000)
    assert looks[0] == DEFAULT_FIRST and looks[-1] == 100_000
    assert all(b > a for a, b in zip(looks[:-1], looks[1:], strict=True))
    ratios = np.diff(np.log(looks[:-1]))
    assert np.allclose(ratios, np.log(1.25), atol=1e-3)
    aligned = look_schedule(50_000, first=1000, growth=1.5, multiple=NOISE_CHUNK)
    assert all(n % NOISE_CHUNK == 0 for n in aligned[:-1]) and aligned[-1] == 50_000
    assert look_schedule(100, first=1000) == (100,)  # a first look past n_max: one look


def test_levels_sum_to_alpha():
    for looks in (1, 2, 22):
        levels = spend(0.001, looks)
        assert levels.sum() <= 0.001 and np.isclose(levels.sum(), 0.001, rtol=1e-12)
        assert np.isclose(levels[-1], 0.001 if looks == 1 else 0.00075)
        assert np.allclose(levels[:-1], 0.00025 / max(1, looks - 1))
    assert np.allclose(spend(0.01, 4, [1, 1, 1, 1]), 0.0025)


def test_one_look_is_the_fixed_n_certificate():
    """With the single look n_max, the reported radii are ``certified_radius`` at alpha,
    thresholded at the targets: the sequential procedure generalises CERTIFY."""
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(6) * 0.3, size=200)  # (200, 6)
    counts = np.stack([rng.multinomial(5_000, row) for row in p])
    labels = p.argmax(axis=1)
    labels[::4] = rng.integers(0, 6, size=len(labels[::4]))
    targets, ks = np.array([0.0, 0.1, 0.3, 0.6]), (1, 2, 4)

    def draw(m, active):
        assert m == 5_000 and active.all()
        return torch.from_numpy(counts)

    cert = _certify_rounds(draw, labels, ks, 0.5, targets, (5_000,), [0.01], futility=0.05)
    radius = certified_radius(counts, labels, ks, 0.5, 0.01).numpy()  # (B, K)
    reached = (np.nan_to_num(radius, nan=-1)[..., None] >= targets).sum(axis=-1)
    expected = np.where(reached > 0, targets[np.maximum(reached - 1, 0)], np.nan)
    np.testing.assert_array_equal(cert.radius.numpy(), expected)
    assert (cert.samples == 5_000).all() and np.array_equal(cert.counts.numpy(), counts)
    assert np.isfinite(expected).any() and np.isnan(expected).any()  # both kinds occur


def test_a_certain_label_stops_at_the_first_look_that_certifies_the_largest_target():
    """Every sample votes for the label: the k = 1 radius after look j is, in closed form,
    sigma * Phi^-1((alpha_j / c)^(1 / n_j)) (the bounds are a^(1/n) and 1 - a^(1/n))."""
    c, sigma, alpha, targets = 10, 0.25, 0.001, (0.25, 0.5, 0.75)
    looks = look_schedule(100_000)
    levels = spend(alpha, len(looks))
    closed = [sigma * ndtri((a / c) ** (1 / n)) for a, n in zip(levels, looks, strict=True)]
    stop = looks[int(np.argmax(np.array(closed) >= 0.75))]
    p = np.eye(c)[3]
    cert = certify_sequential(multinomial_draw(p), [3, 3], 1, sigma, alpha, targets, 100_000)
    assert cert.samples.tolist() == [stop, stop] and cert.radius.tolist() == [[0.75], [0.75]]
    assert 8_000 < stop < 12_000


def test_hopeless_inputs_stop_at_the_first_look_unless_futility_is_off():
    p = np.array([0.05, 0.9, 0.05])  # label 0 is never in the top 1
    draw = multinomial_draw(p)
    cert = certify_sequential(draw, [0] * 4, 1, 0.5, 0.01, (0.25,), 20_000)
    assert cert.samples.tolist() == [1000] * 4 and cert.radius.isnan().all()
    cert = certify_sequential(draw, [0] * 4, 1, 0.5, 0.01, (0.25,), 20_000, futility=None)
    assert cert.samples.tolist() == [20_000] * 4 and cert.radius.isnan().all()


def test_an_input_stops_only_when_every_k_is_decided():
    """k = 2 is certified at the largest target at once; k = 1 (the label nearly tied with
    another one) is not, so the input keeps sampling for k = 1."""
    p = np.array([0.46, 0.44, 0.1 - 1e-9, 1e-9])
    targets = (0.0, 0.5)
    both = certify_sequential(multinomial_draw(p), [0], (1, 2), 1.0, 0.01, targets, 50_000)
    alone = certify_sequential(multinomial_draw(p), [0], (2,), 1.0, 0.01, targets, 50_000)
    assert alone.radius.tolist() == [[0.5]] and both.radius[0, 1] == 0.5
    assert both.samples[0] > alone.samples[0]


def test_a_target_out_of_the_budget_is_given_up_earlier():
    """A label 0.586 against 0.414 needs tens of thousands of samples for r = 0.1 at
    sigma = 0.5: with the budget at a fifth of n_max fewer inputs pursue it to the end. On the
    same streams, every input stops no later and is certified only where it is without the
    budget (the futility rule only ends rounds; it never reports)."""
    p = np.array([0.586, 0.414])
    args = ([0] * 16, 1, 0.5, 0.01, (0.1,), 100_000)
    small = certify_sequential(multinomial_draw(p, 2), *args, budget=0.2)
    full = certify_sequential(multinomial_draw(p, 2), *args, budget=1.0)
    assert (small.samples <= full.samples).all()
    assert small.samples.sum() < 0.8 * full.samples.sum()
    certified_small, certified_full = ~small.radius.isnan(), ~full.radius.isnan()
    assert (certified_full | ~certified_small).all() and certified_full.sum() > 0


def test_reported_radii_are_targets_and_samples_are_looks():
    rng = np.random.default_rng(8)
    p = rng.dirichlet(np.ones(5), size=1)[0]
    targets = (0.1, 0.2, 0.4)
    cert = certify_sequential(multinomial_draw(p, 1), [0, 1, 2, 3, 4] * 10, (1, 2), 0.5, 0.01,
                              targets, 30_000)  # fmt: skip
    r = cert.radius.numpy()
    assert np.isin(r[~np.isnan(r)], targets).all()
    assert np.isin(cert.samples.numpy(), cert.schedule).all()
    assert (cert.counts.sum(dim=1) == cert.samples).all()


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radii": (0.25, -1.0)}, "radii must be finite numbers >= 0, got -1.0"),
        ({"radii": (0.25, float("nan"))}, "radii must be finite"),
        ({"radii": (0.25, 0.25)}, "distinct"),
        ({"radii": ()}, "at least one radius"),
        ({"n_max": 0}, "n_max must be an integer >= 1"),
        ({"alpha": 1.5}, "alpha"),
        ({"top_k": 3}, "1 <= k < c = 3"),
        ({"labels": [0, 3]}, "label 3"),
        ({"labels": [[0, 1]]}, r"labels must have shape \(B,\), got \(1, 2\)"),
        ({"schedule": (100, 50, 1000)}, "strictly increasing"),
        ({"schedule": (100, 500)}, "ending at n_max = 1000"),
        ({"schedule": (10, 100, 1000), "spending": (1.0, 2.0)}, "3 positive weights"),
        ({"schedule": (10, 100, 1000), "spending": (1.0, 0.0, 1.0)}, "positive weights"),
        ({"futility": 0.0}, "futility"),
        ({"budget": 0.0}, "budget must be a share of n_max in"),
        ({"budget": 1.5}, "budget must be a share of n_max in"),
    ],
)
def test_bad_arguments_are_refused_before_drawing(kwargs, match):
    def draw(m, active):
        raise AssertionError("drew before checking the arguments")

    args = dict(labels=[0, 1], top_k=1, sigma=0.5, alpha=0.01, radii=(0.25,), n_max=1000)
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        certify_sequential(draw, num_classes=3, **args)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda m, a: torch.zeros(2, 3, dtype=torch.int64), "summing to 0; expected"),
        (lambda m, a: torch.full((2, 3), m / 3), "integer counts"),
        (lambda m, a: torch.zeros(3, 3, dtype=torch.int64), r"\(2, c\) counts"),
        (lambda m, a: torch.tensor([[m, 0, 0], [m + 1, -1, 0]]), "none negative"),
    ],
)
def test_a_draw_that_breaks_its_contract_is_named(bad, match):
    with pytest.raises(UsageError, match=match):
        certify_sequential(bad, [0, 1], 1, 0.5, 0.01, (0.25,), 1000)


# ----------------------------------------------------------------------- the sampler's rounds
@pytest.mark.parametrize("batch_size", [37, 128, 333, 5000])
def test_rounds_count_the_samples_of_one_call(batch_size):
    """Rounds [0, a) + [a, b) (+ [b, e)) of several inputs sharing batches: the same counts as
    one call [0, e), for batch sizes below, at and above the chunk, and for a subset of the
    inputs in the later rounds (each input alone gets its own stream's samples)."""
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    x, ids = torch.rand(5, 1, 8, 8), [40, 2, 17, 5, 31]
    one = smoothed.sample_counts(x, 700, batch_size=999, seed=9, example_ids=ids)
    a, b = 2 * NOISE_CHUNK, 5 * NOISE_CHUNK
    rounds = [
        smoothed.sample_counts(x, a, batch_size, seed=9, example_ids=ids),
        smoothed.sample_counts(x, b - a, batch_size, seed=9, example_ids=ids, start=a),
        smoothed.sample_counts(x, 700 - b, batch_size, seed=9, example_ids=ids, start=b),
    ]
    torch.testing.assert_close(sum(rounds), one, rtol=0, atol=0)
    later = [3, 0]
    tail = smoothed.sample_counts(
        x[later], 700 - a, batch_size, seed=9, example_ids=[ids[i] for i in later], start=a
    )
    head = smoothed.sample_counts(x[later], a, 64, seed=9, example_ids=[ids[i] for i in later])
    torch.testing.assert_close(head + tail, one[later], rtol=0, atol=0)


def test_a_start_off_the_chunk_grid_is_refused():
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    with pytest.raises(ValueError, match=r"multiple of the noise chunk \(128 samples"):
        smoothed.sample_counts(torch.rand(1, 1, 8, 8), 10, seed=0, start=100)
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        smoothed.sample_counts(torch.rand(1, 1, 8, 8), 10, seed=0, start=-128)


def test_smoothed_certify_sequential_counts_are_those_of_one_call():
    """Each input's counts after it stopped are ``sample_counts`` with that many samples; the
    results do not depend on the batch size or on the other inputs of the call."""
    smoothed = SmoothedClassifier(small_cnn(), num_classes=5, sigma=0.5)
    x, ids = torch.rand(6, 1, 8, 8), [11, 3, 8, 0, 21, 6]
    with torch.no_grad():
        labels = smoothed.model(x).argmax(dim=1)  # (6,)
    labels[4] = (labels[4] + 1) % 5
    args = dict(top_k=(1, 2), radii=(0.0, 0.25, 0.5), n_max=6_000, alpha=0.01, seed=4)
    cert = smoothed.certify_sequential(x, labels, example_ids=ids, first=200, **args)
    assert cert.samples.unique().numel() > 1  # the inputs stopped at different looks
    assert all(n % NOISE_CHUNK == 0 for n in cert.schedule[:-1])
    for i in range(6):
        one = smoothed.sample_counts(
            x[i : i + 1], int(cert.samples[i]), seed=4, example_ids=[ids[i]]
        )
        torch.testing.assert_close(one[0], cert.counts[i], rtol=0, atol=0)
    again = smoothed.certify_sequential(
        x[[4, 1]], labels[[4, 1]], example_ids=[ids[4], ids[1]], first=200, batch_size=37, **args
    )
    torch.testing.assert_close(again.radius, cert.radius[[4, 1]], equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(again.samples, cert.samples[[4, 1]], rtol=0, atol=0)
