"""Training losses of ``NoisyClassifier``: pure functions of logits, labels and a network.

Layout: ``m`` noisy copies of a batch of ``B`` inputs are stacked copy-major, ``(m * B, ...)``
rows ``i * B + b`` (copy i of example b), so that ``logits.view(m, B, C)`` separates them.

- ``"gaussian"``: Gaussian augmentation (Cohen et al., ICML 2019), ``noisy_cross_entropy``.
- ``"consistency"``: Jeong & Shin, "Consistency Regularization for Certified Robustness of
  Smoothed Classifiers" (NeurIPS 2020), ``consistency_loss``.
- ``"smoothadv"``: Salman et al., "Provably Robust Deep Learning via Adversarially Trained
  Smoothed Classifiers" (NeurIPS 2019), ``smoothadv_attack`` then ``noisy_cross_entropy``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from certify.math.validation import UsageError

#: The papers' defaults (consistency's lambda is set from the data and sigma); SmoothAdv: one
#: point of Salman et al.'s grid (epsilon 0.25-2, steps 1-10, m 1-8), their 10 warm-up epochs.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gaussian": {"num_noise_samples": 1},
    "consistency": {"num_noise_samples": 2, "consistency_lambda": None, "consistency_eta": 0.5},
    "smoothadv": {
        "num_noise_samples": 2,
        "smoothadv_epsilon": 1.0,
        "smoothadv_steps": 10,
        "smoothadv_warmup_epochs": 10,
    },
}
#: Jeong & Shin's lambda per kind of data, (below sigma = 0.5, from 0.5 up): their released
#: training commands and certification logs (docs/training.md#losses).
CONSISTENCY_LAMBDA = {"mnist": (10.0, 5.0), "cifar10": (20.0, 10.0), "imagenet": (10.0, 5.0)}
#: Every loss's settings (``NoisyClassifier``'s arguments).
SETTINGS = tuple(dict.fromkeys(key for settings in DEFAULTS.values() for key in settings))
#: Where probabilities are clamped before a log (as in both papers' code).
TINY = 1e-20


def loss_settings(
    loss: str, sigma: float, data_kind: str = "cifar10", **given: Any
) -> dict[str, Any]:
    """Every loss's settings: ``loss``'s with ``None`` replaced by the papers' defaults
    (lambda: ``CONSISTENCY_LAMBDA[data_kind]`` at ``sigma``), the others ``None``. A setting of
    another loss, or consistency with one noise sample, is a ``UsageError``."""
    defaults = dict(DEFAULTS[loss])
    if loss == "consistency":
        defaults["consistency_lambda"] = CONSISTENCY_LAMBDA[data_kind][sigma >= 0.5]
    for other, keys in DEFAULTS.items():
        for key in keys.keys() - defaults.keys():
            if given.get(key) is not None:
                raise UsageError(
                    f"{key} applies to loss {other!r} only, got {given[key]!r} with loss {loss!r}"
                )
    if loss == "consistency" and given.get("num_noise_samples") == 1:
        raise UsageError("loss 'consistency' needs num_noise_samples >= 2 (copies to compare)")
    settings = dict.fromkeys(SETTINGS)
    for key, default in defaults.items():
        value = given.get(key)
        settings[key] = default if value is None else type(default)(value)  # builtin int/float
    return settings


def warmed_up_epsilon(epsilon: float, warmup_epochs: int, epoch: int) -> float:
    """Both papers' linear ramp (epochs from 0), reaching ``epsilon`` in epoch ``warmup - 1``."""
    return min(epsilon, (epoch + 1) * epsilon / warmup_epochs) if warmup_epochs else epsilon


def noisy_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the ``m`` copies: ``logits`` ``(m * B, C)``, ``labels`` ``(B,)``."""
    return F.cross_entropy(logits, labels.repeat(logits.shape[0] // labels.shape[0]))


def consistency_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jeong & Shin's terms per example for ``logits`` ``(m, B, C)``: ``(mean_i KL(p_avg ||
    p_i), H(p_avg))``, each ``(B,)``, with ``p_i`` the softmax of copy i, ``p_avg = mean_i p_i``."""
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


def row_norms(t: torch.Tensor) -> torch.Tensor:
    """l2 norm of each row of ``t`` ``(B, ...)``, shaped ``(B, 1, ...)`` to broadcast, > 0."""
    norms = t.flatten(1).norm(dim=1).clamp_min(torch.finfo(t.dtype).tiny)  # (B,)
    return norms.view(-1, *[1] * (t.dim() - 1))


def smoothadv_attack(net, x, labels, noise, epsilon: float, steps: int) -> torch.Tensor:
    """SmoothAdv-PGD: ``x + delta`` in [0, 1] with ``||delta||_2 <= epsilon`` per example.

    ``steps`` normalised gradient-ascent steps of size ``2 * epsilon / steps`` on
    ``smoothed_soft_loss`` at ``x + delta + noise_i`` from ``delta = 0``, each followed by a
    clamp of ``x + delta`` to [0, 1] and a projection onto the ball; the same noise every step,
    as in the authors' code. A module ``net`` runs in ``eval()`` mode, its parameters untouched.

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
    m, batch, step_size = noise.shape[0], x.shape[0], 2.0 * epsilon / steps
    x = x.detach()
    delta = torch.zeros_like(x)  # (B, C, H, W)
    training = getattr(net, "training", None)
    if training is not None:
        net.eval()
    try:
        for _ in range(steps):
            delta.requires_grad_(True)
            noisy = (x + delta).unsqueeze(0) + noise  # (m, B, C, H, W)
            logits = net(noisy.flatten(0, 1)).view(m, batch, -1)  # (m, B, num_classes)
            loss = smoothed_soft_loss(logits, labels).sum()
            (grad,) = torch.autograd.grad(loss, [delta])  # (B, C, H, W), parameters untouched
            step = grad / row_norms(grad)  # (B, C, H, W); a zero gradient does not move
            delta = ((x + delta.detach() + step_size * step).clamp(0.0, 1.0) - x).detach()
            delta = delta * (epsilon / row_norms(delta)).clamp(max=1.0)  # into the l2 ball
    finally:
        if training is not None:
            net.train(training)
    return (x + delta).clamp(0.0, 1.0).detach()  # (B, C, H, W), rounding kept in [0, 1]
