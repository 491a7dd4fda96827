"""Base classifiers: a registry of architectures and a factory that puts normalisation first.

Every network maps inputs in [0, 1] pixel space to logits. ``build_network`` returns
``nn.Sequential(NormalizeLayer(mean, std), backbone)``, so Gaussian noise added to the input
is noise in pixel space, never in normalised space. Every backbone keeps its classification
head in the attribute ``fc`` (an ``nn.Linear``): a pretrained head is swapped for a fresh one
when the number of classes differs.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from certify.math.validation import check_int
from lightning_modules.cifar_resnet import CifarResNet

TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class NormalizeLayer(nn.Module):
    """Per-channel standardisation ``(x - mean) / std``, the first module of every network.

    ``mean`` and ``std`` are non-persistent buffers: they follow the module across devices but
    stay out of the state dict (they come from the data's config), so the state dict of
    ``Sequential(NormalizeLayer, backbone)`` is the backbone's under the prefix ``1.``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0 for every channel, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits: 3x3 convs (w, 2w, 4w channels) with BN, then an 8w-unit MLP.

    With the default ``width = 8``, about 0.16 M multiply-adds per 8x8 image, so that
    certification (thousands of noisy forward passes per image) stays cheap on a CPU: on 2
    cores, with channels-last activations, it labels about 120,000 noisy images per second,
    6x as many as a contiguous ``width = 16`` network, for the same certified accuracy.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width),
            conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),  # identity for 8x8 inputs, other sizes fit too
        )
        hidden = 8 * width
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2)
        )
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[0](x)  # (B, w, H, W)
        # Channels-last from here on: on a CPU, pooling (and so the network) runs ~2x faster.
        x = self.features[1:](x.contiguous(memory_format=torch.channels_last))  # (B, 4w, 2, 2)
        return self.fc(self.classifier(x))  # (B, num_classes)


def torchvision_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if in_channels != 3:
        raise ValueError(f"model {name!r} takes 3 input channels, the data has {in_channels}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


#: name -> builder(num_classes, in_channels) of a backbone with randomly initialised weights.
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "cifar_resnet20": partial(CifarResNet, 20),
    "cifar_resnet110": partial(CifarResNet, 110),
    **{name: partial(torchvision_resnet, name) for name in TORCHVISION_RESNETS},
}


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def load_weights(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict named by ``weights``: a local file, or a torchvision weights enum name.

    A local file holds the backbone's state dict (``torch.save(model.state_dict(), path)``),
    possibly under a ``"state_dict"`` key and with DataParallel's ``module.`` prefix. A name such
    as ``IMAGENET1K_V2`` or ``DEFAULT`` is looked up in torchvision's weights enum of ``arch``
    and read from ``$TORCH_HOME/hub/checkpoints/`` (downloaded there if missing).

    Raises:
        ValueError: ``weights`` is neither an existing file nor a weights name of ``arch``.
        OSError: the named weights are not cached and cannot be downloaded.
    """
    path = Path(weights).expanduser()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            reason = type(err).__name__  # torch's messages run over many lines
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err.__context__))
            if found:  # never unpickled: the state dict alone, saved where the file is trusted
                reason = (
                    f"it holds pickled Python objects ({found.group(1)}), which are not loaded; "
                    "save the state dict alone with torch.save(model.state_dict(), path)"
                )
            raise ValueError(
                f"weights file {weights!r} is not a readable state dict ({reason})"
            ) from err
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return _strip_prefix(state, "module.")
    if path.suffix in WEIGHT_FILE_SUFFIXES or "/" in weights:
        raise ValueError(f"weights file {weights!r} does not exist")
    if arch not in TORCHVISION_RESNETS:
        raise ValueError(f"weights {weights!r} is not a file, and {arch!r} has no named weights")
    enum = torchvision.models.get_model_weights(arch)
    names = ["DEFAULT", *(member.name for member in enum)]
    if weights not in names:
        raise ValueError(
            f"weights {weights!r} is neither a file nor a weights name of {arch} "
            f"(choose one of: {', '.join(names)})"
        )
    member = enum[weights]
    try:
        return member.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # urllib's URLError included: no network
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
        raise OSError(
            f"cannot download {arch} weights {member.name} ({err}); without network, put the "
            f"file at {cached}"
        ) from err


def build_backbone(
    arch: str, num_classes: int, in_channels: int = 3, weights: str | None = None
) -> nn.Module:
    """A backbone from the registry, optionally with pretrained weights and a new head.

    Args:
        arch: a name in ``MODELS``.
        num_classes: number of outputs.
        in_channels: channels of the input images.
        weights: ``None`` (random initialisation), a torchvision weights name of ``arch``
            (e.g. ``IMAGENET1K_V2``) or a path to a state dict file. When the weights have another
            number of classes, the head ``fc`` is replaced by a freshly initialised one.

    Raises:
        ValueError: unknown ``arch`` (the message lists the valid names) or bad ``weights``.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of: {', '.join(sorted(MODELS))}")
    if weights is None:
        return MODELS[arch](num_classes, in_channels)
    state = load_weights(arch, weights)
    head = state.get("fc.weight")
    if head is None:
        raise ValueError(f"weights {weights!r} have no 'fc.weight': not a {arch} state dict")
    model = MODELS[arch](head.shape[0], in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        summary = " ".join(str(err).split())
        raise ValueError(f"weights {weights!r} do not fit {arch}: {summary[:300]}") from err
    if head.shape[0] != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_network(
    arch: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    weights: str | None = None,
) -> nn.Sequential:
    """``Sequential(NormalizeLayer(mean, std), backbone)``: pixels ``(B, C, H, W)`` -> logits.

    Raises:
        ValueError: bad ``num_classes``, ``mean``/``std``, ``arch`` or ``weights``.
    """
    check_int(num_classes, "num_classes", low=2)
    normalize = NormalizeLayer(mean, std)
    return nn.Sequential(normalize, build_backbone(arch, num_classes, len(mean), weights))
