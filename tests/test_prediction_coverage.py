"""PREDICT with a certified radius per label (``certified_prediction``): validity by simulation.

The promise: with probability at least 1 - alpha, an answer is the top-k set of the smoothed
classifier and every returned label l stays in the top-k for every perturbation of l2 norm
below its stated radius R_l. A trial fails when some returned label's stated radius exceeds
its true radius (Theorem 1 on the exact probabilities; a label outside the true top-k has no
true radius, so any stated radius fails) or the returned set is not the strict top-k. The
rule that judges a frequency is the one of ``test_coverage.py`` (``assert_rate_at_most``).
Teeth: plug-in frequencies in place of the bounds fail the same test on the same samples.
The failure rate without the multiple-testing correction (every bound at level alpha) is
printed too: the bounds' conservatism keeps it near alpha on these configurations, so it is
reported, not asserted (``docs/reliability.md``).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy.special import ndtri

from certify import SmoothedClassifier, radius_from_bounds
from certify.math import prediction
from certify.math.prediction import bound_level, certified_prediction, select_top_k
from certify.math.radius import certified_radius
from certify.math.validation import UsageError
from tests.test_coverage import Slabs, assert_rate_at_most, exceeds, report, strictly_correct


def true_radii(p: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """Theorem 1's radius of every label for exact probabilities ``p`` (NaN: not in the top-k)."""
    c = len(p)
    return radius_from_bounds(p, np.tile(p, (c, 1)), np.arange(c), k, sigma).numpy()[:, 0]


def failures(labels: np.ndarray, radii: np.ndarray, p: np.ndarray, k: int, sigma: float):
    """Per trial: does some returned label claim more than its truth, or is the set wrong."""
    truth = true_radii(p, k, sigma)  # (c,)
    said = labels[:, 0] >= 0  # (T,)
    claimed = truth[np.where(said[:, None], labels, 0)]  # (T, k)
    over = said[:, None] & (np.isnan(claimed) | (radii > claimed + 1e-9))  # (T, k)
    wrong_set = np.zeros_like(said)
    wrong_set[said] = ~strictly_correct(labels[said], p)
    return over.any(axis=1) | wrong_set, said


CONFIGS = {
    # (probabilities, k, n0, n)
    "c=2 tie": (np.array([0.5, 0.5]), 1, 100, 10_000),  # every answer is wrong
    "c=3 k=2": (np.array([0.4, 0.35, 0.25]), 2, 100, 10_000),
    "two-label k=1": (np.array([0.7, 0.2999, *[0.0001 / 8] * 8]), 1, 100, 10_000),
    "spread k=1": (
        np.array([0.4, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.015, 0.005]),
        1,
        100,
        1_000,
    ),
    "spread k=3": (
        np.array([0.4, 0.2, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03, 0.015, 0.005]),
        3,
        100,
        100_000,
    ),
    "three-way tie k=2": (np.array([0.3, 0.3, 0.3, 0.1]), 2, 100, 10_000),  # all answers wrong
}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_stated_radii_exceed_the_truth_at_most_alpha(config, monkeypatch):
    """alpha = 0.1, 2,000 trials per configuration, selection and fresh samples independent.

    Proves: the joint failure (some returned label over its true radius, or a wrong set) stays
    at or under alpha; on the clear configurations most trials are answered (the rule is not
    "always abstain"). Teeth: plug-in frequencies as bounds fail significantly more often than
    alpha on the same samples. The rate without the correction is printed.
    """
    p, k, n0, n = CONFIGS[config]
    alpha, sigma, trials = 0.1, 0.5, 2_000
    rng = np.random.default_rng(zlib.crc32(config.encode()))
    selection = rng.multinomial(n0, p, size=trials)
    fresh = rng.multinomial(n, p, size=trials)
    labels, radii = (t.numpy() for t in certified_prediction(selection, fresh, k, sigma, alpha))
    failed, said = failures(labels, radii, p, k, sigma)
    report(f"PREDICT+radii {config}", int(failed.sum()), trials, alpha)
    print(f"[coverage]   answered {int(said.sum())}/{trials}")
    assert_rate_at_most(int(failed.sum()), trials, alpha, f"certified_prediction {config}")
    if "tie" not in config:
        assert said.mean() > 0.5
    # for the record: no multiple-testing correction
    with monkeypatch.context() as patch:
        patch.setattr(prediction, "bound_level", lambda a, c, k: a)
        unsound = certified_prediction(selection, fresh, k, sigma, alpha)
    naive, _ = failures(unsound[0].numpy(), unsound[1].numpy(), p, k, sigma)
    report(f"PREDICT+radii without correction {config}", int(naive.sum()), trials, alpha)
    # teeth: plug-in frequencies of the fresh sample as bounds
    chosen, separated = (t.numpy() for t in select_top_k(selection, k))
    freq = fresh / n
    rows = np.repeat(np.arange(trials), k)
    plug = radius_from_bounds(
        freq[rows, chosen.reshape(-1)], freq[rows], chosen.reshape(-1), k, sigma
    ).numpy().reshape(trials, k)  # fmt: skip
    plug_said = separated & ~np.isnan(plug).any(axis=1)
    plug_labels = np.where(plug_said[:, None], chosen, -1)
    plug_failed, _ = failures(plug_labels, np.where(plug_said[:, None], plug, np.nan), p, k, sigma)
    report(f"PREDICT+radii plug-in {config}", int(plug_failed.sum()), trials, alpha)
    assert exceeds(int(plug_failed.sum()), trials, alpha)


def test_one_label_is_cohens_certify_of_the_selected_label():
    """k = 1: the radius is CERTIFY (SimuEM, alpha / c) of the label the selection chose."""
    rng = np.random.default_rng(3)
    p = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    selection, fresh = rng.multinomial(100, p, size=200), rng.multinomial(10_000, p, size=200)
    labels, radii = certified_prediction(selection, fresh, 1, 0.25, 0.01)
    ordered = -np.sort(-selection, axis=1)
    chosen = np.argsort(-selection, axis=1, kind="stable")[:, 0]
    expected = certified_radius(fresh, chosen, 1, 0.25, 0.01).numpy()[:, 0]
    answered = labels[:, 0].numpy() >= 0
    assert answered.sum() > 150
    # answered exactly where the selection has a single top label that CERTIFY certifies
    np.testing.assert_array_equal(answered, (ordered[:, 0] > ordered[:, 1]) & ~np.isnan(expected))
    np.testing.assert_array_equal(labels[answered, 0].numpy(), chosen[answered])
    np.testing.assert_array_equal(radii[answered, 0].numpy(), expected[answered])
    assert np.isnan(radii.numpy()[~answered]).all()


def test_radii_are_theorem_1_on_bounds_at_alpha_over_c_plus_k():
    """k >= 2: each chosen label's radius is Theorem 1 on its lower bound and every other
    label's upper bound, all one-sided Clopper-Pearson at alpha / (c + k)."""
    from certify import clopper_pearson_lower, clopper_pearson_upper

    selection = np.array([[60, 30, 10, 0, 0], [40, 30, 30, 0, 0]])
    fresh = np.array([[6000, 3000, 900, 60, 40], [4000, 3900, 1000, 1000, 100]])
    k, sigma, alpha = 2, 0.5, 0.001
    level = alpha / 7
    assert bound_level(alpha, 5, k) == level and bound_level(alpha, 5, 1) == alpha / 5
    labels, radii = certified_prediction(selection, fresh, k, sigma, alpha)
    assert labels.tolist() == [[0, 1], [-1, -1]]  # row 2: labels 1 and 2 tie for the 2nd place
    upper = clopper_pearson_upper(fresh[0], 10_000, level)
    for j, label in enumerate((0, 1)):
        pl = clopper_pearson_lower(fresh[0, label], 10_000, level)
        expected = radius_from_bounds([pl], upper[None], [label], k, sigma)[0, 0]
        assert radii[0, j].item() == expected.item()
    assert torch.isnan(radii[1]).all()


def test_abstains_when_a_chosen_label_is_not_certified():
    """The selection singles out {0, 1} but the fresh counts cannot tell label 1 from 2."""
    labels, radii = certified_prediction([[70, 20, 10]], [[7000, 1500, 1500]], 2, 0.5, 0.001)
    assert labels.tolist() == [[-1, -1]] and torch.isnan(radii).all()


@pytest.mark.parametrize(
    ("selection", "counts", "message"),
    [
        ([[1, 2]], [[1, 2], [3, 4]], "counts must have the selection counts' shape"),
        ([[1, 2, 3]], [[1, 2, 3]], "k must satisfy 1 <= k < c = 3, got k = 3"),
        ([[0, 0, 0]], [[1, 2, 3]], "counts of row 0 sum to 0"),
        ([[3, 2, 1]], [[0, 0, 0]], "counts of row 0 sum to 0"),
    ],
)
def test_bad_arguments(selection, counts, message):
    k = 3 if "k = 3" in message else 1
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        certified_prediction(selection, counts, k, 0.5, 0.01)


def slab_classifier(p: np.ndarray, sigma: float, x: torch.Tensor) -> SmoothedClassifier:
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    offset = float(x[0].double() @ (w / w.norm()))
    edges = torch.tensor(offset + sigma * ndtri(np.cumsum(p)[:-1]), dtype=torch.float64)
    return SmoothedClassifier(Slabs(w, edges), num_classes=len(p), sigma=sigma)


def test_predict_certified_uses_independent_selection_and_certify_streams():
    """``SmoothedClassifier.predict_certified`` is ``certified_prediction`` of the selection
    streams' n0 counts and the certify streams' n counts, whatever the batch size and the
    other inputs of the call (and it draws no fresh samples where the selection ties)."""
    p, sigma = np.array([0.45, 0.35, 0.15, 0.05]), 0.25
    x = torch.full((6, 3), 0.5)
    smoothed = slab_classifier(p, sigma, x)
    ids = [3, 1, 4, 15, 9, 2]
    labels, radii = smoothed.predict_certified(x, 2, 50, 2000, 0.01, seed=5, example_ids=ids)
    selection = smoothed.sample_counts(x, 50, seed=5, example_ids=ids, purpose="selection")
    fresh = smoothed.sample_counts(x, 2000, seed=5, example_ids=ids)
    assert not torch.equal(selection, smoothed.sample_counts(x, 50, seed=5, example_ids=ids))
    expected = certified_prediction(selection, fresh, 2, sigma, 0.01)
    assert torch.equal(labels, expected[0])
    torch.testing.assert_close(radii, expected[1], rtol=0, atol=0, equal_nan=True)
    assert (labels[:, 0] >= 0).sum() >= 3  # a clear top-2: mostly answered
    part, part_radii = smoothed.predict_certified(
        x[2:4], 2, 50, 2000, 0.01, batch_size=7, seed=5, example_ids=ids[2:4]
    )
    assert torch.equal(part, labels[2:4])
    torch.testing.assert_close(part_radii, radii[2:4], rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize(("p", "k"), [((0.5, 0.5), 1), ((0.45, 0.35, 0.15, 0.05), 2)])
def test_smoothed_classifier_predict_certified_at_most_alpha(p, k):
    """End to end through ``SmoothedClassifier.predict_certified`` with the ``Slabs``
    classifier (closed-form probabilities), alpha = 0.2, n0 = 100, n = 1000, 600 independent
    noise streams: the joint failure rate stays at or under alpha; at the exact tie the rule
    answers rarely, with a clear top-2 it answers most of the time."""
    p = np.array(p)
    alpha, sigma, trials = 0.2, 0.25, 600
    x = torch.full((trials, 3), 0.5)
    smoothed = slab_classifier(p, sigma, x)
    labels, radii = smoothed.predict_certified(
        x, k, 100, 1000, alpha, batch_size=10_000, seed=11, example_ids=list(range(trials))
    )
    failed, said = failures(labels.numpy(), radii.numpy(), p, k, sigma)
    report(
        f"PREDICT+radii SmoothedClassifier p={p.tolist()} k={k}", int(failed.sum()), trials, alpha
    )
    print(f"[coverage] SmoothedClassifier.predict_certified answered {int(said.sum())}/{trials}")
    assert_rate_at_most(int(failed.sum()), trials, alpha, "predict_certified")
    if p[k - 1] > p[k]:
        assert said.mean() > 0.8
