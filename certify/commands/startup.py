"""What ``certify`` and ``predict`` say before sampling, and where they write by default.

The start-up line names everything a certificate is about: the checkpoint, the architecture,
sigma (and the sigma the model was trained with), the model's normalisation, the sample sizes,
alpha, k, the device and the sampler's options. A sigma on another input scale, a wrong
normalisation or a checkpoint of another noise level shows there, before any sampling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

#: Where runs go when no ``--output_dir`` is given: ``runs/<command>/<run name>``.
RUNS = Path("runs")


def weights_name(ckpt_path: str | None, weights: str | None, sha256: str | None) -> str:
    """A readable, distinct name for the weights: the checkpoint's run and file name (or the
    pretrained weights' name) and the first 8 hex digits of the file's sha256.

    Example:
        >>> weights_name("runs/digits/abc123/checkpoints/last.ckpt", None, "3fa2c1d09e")
        'abc123-last-3fa2c1d0'
    """
    if ckpt_path is not None:
        path = Path(ckpt_path)
        stem = path.name.split(".")[0] or path.name
        name = f"{path.parent.parent.name}-{stem}" if path.parent.name == "checkpoints" else stem
    else:
        name = Path(str(weights)).name.split(".")[0] if weights else "weights"
    if sha256:
        name = f"{name}-{sha256[:8]}"
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "weights"


@dataclass(frozen=True)
class Weights:
    """What was loaded: ``description`` (start-up line), ``name`` (default output directory)
    and ``trained_sigma`` (None when the weights do not record it)."""

    description: str
    name: str
    trained_sigma: float | None

    @classmethod
    def of(cls, model, ckpt_path: str | None, kind: str | None, sha256: str | None) -> Weights:
        """The weights of ``model`` after loading ``ckpt_path`` (of format ``kind``), or its
        pretrained ``--model.weights`` when there is no checkpoint."""
        pretrained = getattr(model, "hparams", {}).get("weights")
        if ckpt_path is None:
            description = f"none (pretrained weights {pretrained})"
        else:
            fmt = {"lightning": "Lightning", "cohen": "Cohen et al.'s format"}.get(kind, kind)
            description = f"{ckpt_path} ({fmt}, sha256 {str(sha256)[:12]})"
        # Our Lightning checkpoints carry the training sigma (the CLI reads it back into the
        # model); Cohen et al.'s files and pretrained weights do not.
        trained = float(model.sigma) if kind == "lightning" else None
        return cls(description, weights_name(ckpt_path, pretrained, sha256), trained)


def default_output_dir(command: str, weights: str, what: str, **settings) -> Path:
    """``runs/<command>/<weights>_<what>_<key><value>...``, e.g.
    ``runs/certify/abc123-last-3fa2c1d0_test_n100000_sigma0.25_k1-3-5`` (``n0-100`` for a key
    that ends in a digit).

    Example:
        >>> str(default_output_dir("certify", "w", "test", n=10, sigma=0.25, k=(1, 3)))
        'runs/certify/w_test_n10_sigma0.25_k1-3'
    """
    parts = [weights, re.sub(r"[^A-Za-z0-9._=-]+", "_", what).strip("_")]
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = "-".join(str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}-{value}" if key[-1].isdigit() else f"{key}{value}")  # n0-100
    return RUNS / command / "_".join(parts)


def normalisation(net: nn.Module) -> str:
    """``mean (...) std (...)`` of the network's first module, or what stands there instead."""
    first = net[0] if isinstance(net, nn.Sequential) and len(net) else None
    mean, std = getattr(first, "mean", None), getattr(first, "std", None)
    if mean is None or std is None:
        return f"none as first module ({type(first or net).__name__})"

    def values(t) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in t.flatten().tolist()) + ")"

    return f"mean {values(mean)} std {values(std)}"


def startup_line(
    command: str,
    *,
    weights: Weights,
    arch: str | None,
    sigma: float,
    net: nn.Module,
    device: str,
    settings: dict,
    options: dict,
) -> str:
    """One line: ``<command>: checkpoint ...; arch ...; sigma ...; normalisation ...; ...``.

    Args:
        weights: the checkpoint (or pretrained weights) and the sigma it was trained with.
        settings: the certificate's settings in order (n, alpha, k, ...).
        options: the sampler's options (batch size, seed, precision, ...).
    """
    trained_sigma = weights.trained_sigma
    if trained_sigma is None:
        trained = "the weights do not record a training sigma"
    elif abs(trained_sigma - sigma) > 1e-12 * max(1.0, sigma):
        trained = f"NOT the training sigma {trained_sigma:g}"
    else:
        trained = "as trained"

    def listing(values: dict) -> str:
        def text(v) -> str:
            if isinstance(v, (list, tuple)):
                return " ".join(map(str, v))
            return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        return ", ".join(f"{key} {text(value)}" for key, value in values.items())

    return (
        f"{command}: checkpoint {weights.description}; arch {arch or 'unknown'}; sigma {sigma:g} "
        f"({trained}); normalisation {normalisation(net)}; {listing(settings)}; device "
        f"{device}; {listing(options)}"
    )


def device_text(trainer) -> str:
    """``cpu``, ``cuda:0``, or ``cuda x 8 processes`` for a run over several processes."""
    device = trainer.strategy.root_device
    if trainer.world_size > 1:
        return f"{device.type} x {trainer.world_size} processes"
    return str(device)
