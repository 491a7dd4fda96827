"""The training losses against direct computations on tiny batches (``lightning_modules.losses``)
and their wiring into ``NoisyClassifier.training_step``."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jsonargparse import ArgumentError
from scipy.stats import entropy as scipy_entropy
from sklearn.datasets import load_digits

from certify.math.validation import UsageError
from datamodules import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule
from lightning_modules import NoisyClassifier
from lightning_modules.losses import (
    consistency_loss,
    consistency_terms,
    loss_settings,
    noisy_cross_entropy,
    smoothadv_attack,
    smoothed_soft_loss,
    warmed_up_epsilon,
)
from lightning_modules.models import build_network
from tests.conftest import parse_init
from tests.messages import assert_names

DIGITS_NORM = ((0.3053,), (0.3760,))


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def random_logits(m: int, batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(m * batch, classes, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize(("m", "batch", "classes"), [(2, 3, 4), (3, 5, 10)])
def test_consistency_loss_term_by_term(m, batch, classes):
    """CE, KL and entropy of every example, from NumPy / SciPy on copy i of example b = row
    i * B + b."""
    logits = random_logits(m, batch, classes)
    labels = torch.arange(batch) % classes
    lam, eta = 7.0, 0.3
    rows = logits.numpy().reshape(m, batch, classes)
    ce, kl, ent = [], [], []
    for b in range(batch):
        p = [softmax(rows[i, b]) for i in range(m)]
        p_avg = sum(p) / m
        ce += [-math.log(p[i][labels[b]]) for i in range(m)]
        kl.append(np.mean([scipy_entropy(p_avg, p[i]) for i in range(m)]))  # KL(p_avg || p_i)
        ent.append(scipy_entropy(p_avg))
    got_kl, got_entropy = consistency_terms(logits.view(m, batch, classes))
    np.testing.assert_allclose(got_kl.numpy(), kl, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_entropy.numpy(), ent, rtol=1e-10)
    loss, got_ce = consistency_loss(logits, labels, lam, eta)
    assert got_ce.item() == pytest.approx(np.mean(ce), rel=1e-12)
    assert noisy_cross_entropy(logits, labels).item() == pytest.approx(np.mean(ce), rel=1e-12)
    expected = np.mean(ce) + lam * np.mean(kl) + eta * np.mean(ent)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_consistency_kl_vanishes_for_identical_copies_and_gradients_are_finite():
    logits = random_logits(1, 4, 6).repeat(3, 1).requires_grad_(True)  # 3 identical copies
    kl, entropy = consistency_terms(logits.view(3, 4, 6))
    assert kl.abs().max().item() < 1e-12 and (entropy > 0).all()
    confident = torch.tensor([[60.0, -60.0, 0.0]]).repeat(2, 1).requires_grad_(True)
    loss, _ = consistency_loss(confident, torch.tensor([0]), 20.0, 0.5)  # p_avg has zeros
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(confident.grad).all()


def test_smoothed_soft_loss_is_minus_log_of_the_mean_probability():
    logits = random_logits(4, 3, 5).view(4, 3, 5)
    labels = torch.tensor([4, 0, 2])
    rows = logits.numpy()
    expected = [
        -math.log(np.mean([softmax(rows[i, b])[labels[b]] for i in range(4)])) for b in range(3)
    ]
    np.testing.assert_allclose(smoothed_soft_loss(logits, labels).numpy(), expected, rtol=1e-12)


@pytest.fixture(scope="module")
def digits_batch():
    """16 real digits ``(16, 1, 8, 8)`` in [0, 1], their labels, and a digits CNN whose BatchNorm
    statistics are those of the data (a few forward passes in train mode)."""
    data = load_digits()
    x = torch.tensor(data.images[:16] / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target[:16])
    torch.manual_seed(0)
    net = build_network("digits_cnn", 10, *DIGITS_NORM)
    with torch.no_grad():
        for _ in range(3):
            net(x + 0.25 * torch.randn_like(x))
    return x, y, net


def gaussian(shape, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def smoothed_loss_at(net, x, y, noise) -> torch.Tensor:
    with torch.no_grad():
        logits = net((x.unsqueeze(0) + noise).flatten(0, 1)).view(noise.shape[0], len(x), -1)
    return smoothed_soft_loss(logits, y)  # (B,)


@pytest.mark.parametrize(("epsilon", "steps", "m"), [(0.25, 1, 1), (0.5, 4, 2), (2.0, 10, 4)])
def test_smoothadv_perturbation_is_in_the_ball_and_raises_the_smoothed_loss(
    digits_batch, epsilon, steps, m
):
    x, y, net = digits_batch
    net.eval()
    noise = gaussian((m, *x.shape), 0.25, seed=1)  # (m, B, 1, 8, 8)
    x_adv = smoothadv_attack(net, x, y, noise, epsilon, steps)
    norms = (x_adv - x).flatten(1).norm(dim=1)  # (B,)
    assert norms.max().item() <= epsilon * (1 + 1e-6)
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    before, after = smoothed_loss_at(net, x, y, noise), smoothed_loss_at(net, x_adv, y, noise)
    assert (after > before).all(), (before, after)


def test_one_smoothadv_step_is_the_normalised_gradient_step(digits_batch):
    """steps = 1: x' = project(clamp(x + 2 epsilon g / ||g||)), g the gradient of the smoothed
    loss computed here copy by copy."""
    x, y, net = digits_batch
    net.eval()
    epsilon, noise = 0.3, gaussian((3, *x.shape), 0.5, seed=2)
    x0 = x.clone().requires_grad_(True)
    probs = sum(F.softmax(net(x0 + noise[i]), dim=1) for i in range(3)) / 3  # (B, 10)
    (g,) = torch.autograd.grad((-probs[torch.arange(len(y)), y].log()).sum(), [x0])  # (B, ...)
    moved = (x + 2 * epsilon * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1) - x
    scale = (epsilon / moved.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
    expected = x + moved * scale
    torch.testing.assert_close(smoothadv_attack(net, x, y, noise, epsilon, 1), expected)


def test_smoothadv_leaves_the_network_alone(digits_batch):
    x, y, net = digits_batch
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x_adv = smoothadv_attack(net, x, y, gaussian((2, *x.shape), 0.25, seed=3), 0.5, 3)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN statistics
    assert not x_adv.requires_grad
    assert smoothadv_attack(net, x, y, gaussian((2, *x.shape), 0.25, 3), 0.0, 3) is x


def test_epsilon_warm_up_is_linear_over_the_first_epochs():
    ramp = [warmed_up_epsilon(0.5, 4, epoch) for epoch in range(6)]
    assert ramp == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert warmed_up_epsilon(0.5, 0, 0) == 0.5


@pytest.mark.parametrize(
    ("data_kind", "sigma", "lam"),
    [
        ("cifar10", 0.12, 20.0), ("cifar10", 0.49, 20.0), ("cifar10", 0.5, 10.0),
        ("cifar10", 1.0, 10.0), ("mnist", 0.25, 10.0), ("mnist", 0.5, 5.0), ("mnist", 1.0, 5.0),
        ("imagenet", 0.25, 10.0), ("imagenet", 0.5, 5.0), ("imagenet", 1.0, 5.0),
    ],
)  # fmt: skip
def test_consistency_defaults_follow_the_paper_for_the_data(data_kind, sigma, lam):
    """Jeong & Shin's lambda for the kind of data and the noise level; the module's default
    kind is CIFAR-10's, and the datamodules name theirs."""
    settings = loss_settings("consistency", sigma, data_kind)
    assert settings["consistency_lambda"] == lam and settings["consistency_eta"] == 0.5
    module = NoisyClassifier(
        "digits_cnn", 10, *DIGITS_NORM, sigma, loss="consistency", data_kind=data_kind
    )
    assert module.hparams["consistency_lambda"] == lam and module.hparams["data_kind"] == data_kind
    assert NoisyClassifier("digits_cnn", 10, *DIGITS_NORM).hparams["data_kind"] == "cifar10"
    assert [DigitsDataModule.data_kind, CIFAR10DataModule.data_kind] == ["mnist", "cifar10"]
    assert ImageNetDataModule.data_kind == "imagenet"
    assert settings["num_noise_samples"] == 2 and settings["smoothadv_epsilon"] is None
    assert loss_settings("gaussian", sigma)["num_noise_samples"] == 1
    smoothadv = loss_settings("smoothadv", sigma, smoothadv_warmup_epochs=0)
    assert smoothadv["smoothadv_warmup_epochs"] == 0 and smoothadv["smoothadv_steps"] == 10


@pytest.mark.parametrize(
    ("loss", "settings", "message"),
    [
        ("gaussian", {"consistency_lambda": 5.0}, "consistency_lambda applies to loss 'consis"),
        ("consistency", {"smoothadv_steps": 2}, "smoothadv_steps applies to loss 'smoothadv'"),
        ("consistency", {"num_noise_samples": 1}, "needs num_noise_samples >= 2"),
    ],
)
def test_settings_of_another_loss_are_refused_in_one_line(loss, settings, message):
    with pytest.raises(UsageError) as error:
        NoisyClassifier("digits_cnn", 10, *DIGITS_NORM, loss=loss, **settings)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("loss", "hinge"),
        ("num_noise_samples", "0"),
        ("consistency_lambda", "-1"),
        ("consistency_eta", "nan"),
        ("smoothadv_epsilon", "inf"),
        ("smoothadv_steps", "0"),
        ("smoothadv_warmup_epochs", "1.5"),
    ],
)
def test_bad_values_are_refused_by_the_signature(option, value):
    """What the CLI parses: the message names the setting and the value."""
    args = ["--arch", "digits_cnn", "--num_classes", "10", "--mean", "[0.3]", "--std", "[0.4]"]
    with pytest.raises(ArgumentError) as error:
        parse_init(NoisyClassifier, *args, f"--{option}", value)
    assert_names(" ".join(str(error.value).split()), f"init.{option}", value)


class RecordingClassifier(NoisyClassifier):
    """Keeps every noisy batch ``add_noise`` returns (the noise itself is the module's)."""

    def add_noise(self, x):
        self.drawn = [*getattr(self, "drawn", []), super().add_noise(x)]
        return self.drawn[-1]


@pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning")
@pytest.mark.parametrize("loss", ["gaussian", "consistency", "smoothadv"])
def test_training_step_computes_its_loss_from_the_drawn_noise(digits_batch, loss):
    """``training_step`` in eval mode (no dropout) against the same loss computed here from the
    noisy batches that ``add_noise`` returned: m copies, copy-major; SmoothAdv attacks with the
    noise it then trains on, at the warmed-up epsilon of epoch 0."""
    x, y, _ = digits_batch
    extra = {"smoothadv_epsilon": 0.8, "smoothadv_steps": 3} if loss == "smoothadv" else {}
    torch.manual_seed(0)
    model = RecordingClassifier("digits_cnn", 10, *DIGITS_NORM, sigma=0.5, loss=loss, **extra)
    model.eval()
    got = model.training_step((x, y), 0)
    (drawn,) = model.drawn
    m = 1 if loss == "gaussian" else 2
    assert drawn.shape == (m * len(x), *x.shape[1:])
    if loss == "smoothadv":
        noise = drawn.view(m, *x.shape)  # drawn around zeros: the noise itself
        assert abs(noise.std().item() - 0.5) < 0.05
        x_adv = smoothadv_attack(model.net, x, y, noise, 0.8 / 10, 3)  # epoch 0 of 10 warm-up
        assert 0 < (x_adv - x).flatten(1).norm(dim=1).max().item() <= 0.08 * (1 + 1e-6)
        expected = noisy_cross_entropy(model.net((x_adv.unsqueeze(0) + noise).flatten(0, 1)), y)
    else:
        noise = drawn - x.repeat(m, 1, 1, 1)
        assert abs(noise.std().item() - 0.5) < 0.05
        logits = model.net(drawn)
        if loss == "consistency":
            expected, _ = consistency_loss(logits, y, 10.0, 0.5)  # lambda 10 at sigma 0.5
        else:
            expected = F.cross_entropy(logits, y)
    torch.testing.assert_close(got, expected)
