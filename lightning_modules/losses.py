"""Training losses of ``NoisyClassifier``: pure functions of logits, labels and a network.

Layout: ``m`` noisy copies of a batch of ``B`` inputs are stacked copy-major, ``(m * B, ...)``
rows ``i * B + b`` (copy i of example b), so that ``logits.view(m, B, C)`` separates them.

- ``noisy_cross_entropy``: Gaussian augmentation (Cohen et al., ICML 2019), the cross-entropy
  averaged over all noisy copies.
- ``consistency_terms``: the regulariser of Jeong & Shin, "Consistency Regularization for
  Certified Robustness of Smoothed Classifiers" (NeurIPS 2020).
- ``smoothadv_attack``: the l2 PGD attack on the smoothed soft classifier of Salman et al.,
  "Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers" (NeurIPS 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from certify.math.validation import check_int

#: The training losses, by name (``NoisyClassifier(loss=...)``).
LOSSES = ("gaussian", "consistency", "smoothadv")
#: The settings that belong to one loss only.
SETTINGS_OF = {
    "consistency": ("consistency_lambda", "consistency_eta"),
    "smoothadv": ("smoothadv_epsilon", "smoothadv_steps", "smoothadv_warmup_epochs"),
}
#: Jeong & Shin's eta, and their lambda below sigma = 0.5 (their sigma = 0.25) and from 0.5 up.
CONSISTENCY_ETA = 0.5
CONSISTENCY_LAMBDA_LOW_SIGMA, CONSISTENCY_LAMBDA_HIGH_SIGMA = 20.0, 10.0
#: SmoothAdv: one point of Salman et al.'s grid (epsilon in {0.25, 0.5, 1, 2}, steps in
#: {1, 2, 4, 8, 10}, m in {1, 2, 4, 8}), with their 10 warm-up epochs.
SMOOTHADV_EPSILON, SMOOTHADV_STEPS, SMOOTHADV_WARMUP_EPOCHS = 1.0, 10, 10
#: Where probabilities are clamped before a log (as in both papers' code).
TINY = 1e-20


def check_nonnegative(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def default_consistency_lambda(sigma: float) -> float:
    """Jeong & Shin's lambda: 20 at sigma = 0.25, 10 at sigma = 0.5 and 1.0 (CIFAR-10)."""
    return CONSISTENCY_LAMBDA_LOW_SIGMA if sigma < 0.5 else CONSISTENCY_LAMBDA_HIGH_SIGMA


def loss_settings(loss: str, sigma: float, **settings: Any) -> dict[str, Any]:
    """The checked settings of ``loss``, ``None`` replaced by the papers' defaults.

    ``settings``: ``num_noise_samples`` and the keys of ``SETTINGS_OF``. Returns every key:
    the ones of other losses stay ``None`` (setting one of them is an error: it would be
    silently ignored otherwise).
    """
    if loss not in LOSSES:
        choices = ", ".join(repr(name) for name in LOSSES)
        raise ValueError(f"loss must be one of {choices}, got {loss!r}")
    for other, keys in SETTINGS_OF.items():
        for key in keys:
            if other != loss and settings.get(key) is not None:
                raise ValueError(
                    f"{key} applies to loss {other!r} only, got {settings[key]!r} with "
                    f"loss {loss!r}"
                )
    m = settings.get("num_noise_samples")
    if loss == "consistency" and check_int(m, "num_noise_samples", optional=True) == 1:
        raise ValueError(
            "loss 'consistency' needs num_noise_samples >= 2 (copies to compare), got 1"
        )
    defaults = {
        "num_noise_samples": 1 if loss == "gaussian" else 2,
        "consistency_lambda": default_consistency_lambda(sigma),
        "consistency_eta": CONSISTENCY_ETA,
        "smoothadv_epsilon": SMOOTHADV_EPSILON,
        "smoothadv_steps": SMOOTHADV_STEPS,
        "smoothadv_warmup_epochs": SMOOTHADV_WARMUP_EPOCHS,
    }
    checks = {
        "num_noise_samples": check_int,
        "consistency_lambda": check_nonnegative,
        "consistency_eta": check_nonnegative,
        "smoothadv_epsilon": check_nonnegative,
        "smoothadv_steps": check_int,
        "smoothadv_warmup_epochs": lambda v, name: check_int(v, name, low=0),
    }
    resolved: dict[str, Any] = {"num_noise_samples": None}
    resolved.update({key: None for keys in SETTINGS_OF.values() for key in keys})
    for key in ("num_noise_samples", *SETTINGS_OF.get(loss, ())):
        value = settings.get(key)
        resolved[key] = defaults[key] if value is None else checks[key](value, key)
    return resolved


def warmed_up_epsilon(epsilon: float, warmup_epochs: int, epoch: int) -> float:
    """``min(epsilon, (epoch + 1) * epsilon / warmup_epochs)`` (epochs from 0), as both papers'
    code: a linear ramp reaching ``epsilon`` in epoch ``warmup_epochs - 1``."""
    if warmup_epochs == 0:
        return epsilon
    return min(epsilon, (epoch + 1) * epsilon / warmup_epochs)


def noisy_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the ``m`` copies: ``logits`` ``(m * B, C)``, ``labels`` ``(B,)``."""
    m = logits.shape[0] // labels.shape[0]
    return F.cross_entropy(logits, labels.repeat(m))


def consistency_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jeong & Shin's two terms, per example, for ``logits`` ``(m, B, C)`` of ``m`` copies.

    Returns ``(kl, entropy)``, each ``(B,)``: ``kl = mean_i KL(p_avg || p_i)`` with ``p_i`` the
    softmax of copy i and ``p_avg = mean_i p_i``, and ``entropy = H(p_avg)`` (natural logs).
    """
    log_p = logits.log_softmax(dim=-1)  # (m, B, C)
    p_avg = log_p.exp().mean(dim=0)  # (B, C)
    log_avg = p_avg.clamp_min(TINY).log()  # (B, C)
    kl = (p_avg * (log_avg - log_p)).sum(dim=-1).mean(dim=0)  # (B,)
    entropy = -(p_avg * log_avg).sum(dim=-1)  # (B,)
    return kl, entropy


def consistency_loss(
    logits: torch.Tensor, labels: torch.Tensor, lam: float, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, cross-entropy)``: mean CE over the copies + batch means of ``lam * kl + eta *
    entropy``. ``logits`` ``(m * B, C)`` copy-major, ``labels`` ``(B,)``."""
    ce = noisy_cross_entropy(logits, labels)
    kl, entropy = consistency_terms(logits.view(-1, labels.shape[0], logits.shape[-1]))
    return ce + lam * kl.mean() + eta * entropy.mean(), ce


def smoothed_soft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-log(mean_i softmax(logits_i)[y])`` per example: the loss of the smoothed soft
    classifier estimated with ``m`` noise samples; ``logits`` ``(m, B, C)`` -> ``(B,)``."""
    p_avg = logits.softmax(dim=-1).mean(dim=0)  # (B, C)
    return -p_avg.gather(1, labels.view(-1, 1)).squeeze(1).clamp_min(TINY).log()  # (B,)


def l2_project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Each row of ``delta`` ``(B, ...)`` scaled into the l2 ball of radius ``epsilon``."""
    norms = delta.flatten(1).norm(dim=1)  # (B,)
    scale = (epsilon / norms.clamp_min(torch.finfo(delta.dtype).tiny)).clamp(max=1.0)  # (B,)
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


def smoothadv_attack(
    net: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    noise: torch.Tensor,
    epsilon: float,
    steps: int,
) -> torch.Tensor:
    """SmoothAdv-PGD: ``x + delta`` with ``||delta||_2 <= epsilon`` per example, in [0, 1].

    ``steps`` steps of normalised gradient ascent of size ``2 * epsilon / steps`` on
    ``smoothed_soft_loss`` of ``net`` at ``x + delta + noise_i``, from ``delta = 0``; after
    every step ``x + delta`` is clamped to [0, 1] and ``delta`` projected onto the ball (a
    shrunk delta keeps ``x + delta`` in [0, 1]). The same ``noise`` ``(m, B, C, H, W)`` serves
    every step (Salman et al.'s and Jeong & Shin's code). An example whose gradient is zero
    does not move. ``net`` runs in ``eval()`` mode (BatchNorm statistics and dropout are left
    alone) and gets no parameter gradients; its mode is restored.

    Args:
        net: pixels ``(N, C, H, W)`` -> logits ``(N, num_classes)``.
        x: clean inputs ``(B, C, H, W)`` in [0, 1].
        labels: ``(B,)`` class indices.
        noise: ``(m, B, C, H, W)`` Gaussian noise, already scaled by sigma.
        epsilon: l2 radius of the perturbation (pixel units); 0 returns ``x``.
        steps: number of PGD steps (>= 1).
    """
    if epsilon == 0:
        return x
    m, batch = noise.shape[0], x.shape[0]
    step_size = 2.0 * epsilon / steps
    x = x.detach()
    delta = torch.zeros_like(x)  # (B, C, H, W)
    training = getattr(net, "training", False)
    if isinstance(net, nn.Module):
        net.eval()
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            noisy = (x + delta).unsqueeze(0) + noise  # (m, B, C, H, W)
            logits = net(noisy.flatten(0, 1)).view(m, batch, -1)  # (m, B, num_classes)
            loss = smoothed_soft_loss(logits, labels).sum()
            (grad,) = torch.autograd.grad(loss, [delta])  # (B, C, H, W), parameters untouched
            norms = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)  # (B,)
            step = grad / norms.view(-1, *[1] * (grad.dim() - 1))  # (B, C, H, W)
            delta = ((x + delta.detach() + step_size * step).clamp(0.0, 1.0) - x).detach()
            delta = l2_project(delta, epsilon)
    finally:
        if isinstance(net, nn.Module):
            net.train(training)
    return (x + delta).clamp(0.0, 1.0).detach()  # (B, C, H, W), rounding kept in [0, 1]
