"""Base classifiers: ``Sequential(NormalizeLayer(mean, std), backbone)`` on [0, 1] pixels (the
noise is never added in normalised space); every backbone's head is an ``nn.Linear`` ``fc``."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from certify.math.validation import UsageError
from lightning_modules.cifar_resnet import CifarResNet

TORCHVISION_RESNETS = ("resnet18", "resnet50", "resnet101")


class NormalizeLayer(nn.Module):
    """Per-channel ``(x - mean) / std``, not in the state dict (the data's config sets it)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean or min(std) <= 0:
            raise UsageError(f"mean and std: one per channel, std must be > 0, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std  # (B, C, H, W)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits: 3x3 convs (w, 2w, 4w channels) with BN, then an 8w-unit MLP;
    ~0.16 M multiply-adds per image at w = 8 (~120,000 noisy images/s on 2 CPU cores)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        w = width  # AdaptiveAvgPool2d(2): identity for 8x8 inputs, other sizes fit too
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w), conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2))  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * w, 8 * w), nn.ReLU(True),
                                        nn.Dropout(0.2))  # fmt: skip
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[0](x)  # (B, w, H, W)
        # Channels-last from here on: on a CPU, pooling (and so the network) runs ~2x faster.
        x = self.features[1:](x.contiguous(memory_format=torch.channels_last))  # (B, 4w, 2, 2)
        return self.fc(self.classifier(x))  # (B, num_classes)


def torchvision_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if in_channels != 3:
        raise UsageError(f"model {name!r} takes 3 input channels, the data has {in_channels}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


#: name -> builder(num_classes, in_channels) of a backbone with randomly initialised weights.
MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "cifar_resnet20": partial(CifarResNet, 20),
    "cifar_resnet110": partial(CifarResNet, 110),
    **{name: partial(torchvision_resnet, name) for name in TORCHVISION_RESNETS},
}


def load_weights(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict in file ``weights`` (weights-only), or ``arch``'s torchvision weights of
    that name (downloaded if missing; else an ``OSError`` names the file to put in place)."""
    path = Path(weights).expanduser()
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            reason = type(err).__name__  # torch's messages run over many lines
            if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err.__context__)):
                reason = (f"it holds pickled Python objects ({found.group(1)}), which are not "
                          "loaded; save the state dict alone with torch.save(model.state_dict(), "
                          "path)")  # fmt: skip
            raise UsageError(f"weights file {weights!r} is not a readable state dict ({reason})") \
                from None  # fmt: skip
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if state and all(key.startswith("module.") for key in state):
            state = {key.removeprefix("module."): value for key, value in state.items()}
        return state
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or "/" in weights:
        raise UsageError(f"weights file {weights!r} does not exist")
    if arch not in TORCHVISION_RESNETS:
        raise UsageError(f"weights {weights!r} is not a file, and {arch!r} has no named weights")
    enum = torchvision.models.get_model_weights(arch)
    names = ["DEFAULT", *(member.name for member in enum)]
    if weights not in names:
        raise UsageError(f"weights {weights!r} is neither a file nor a weights name of {arch} "
                         f"(choose one of: {', '.join(names)})")  # fmt: skip
    try:
        return enum[weights].get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # urllib's URLError included: no network
        cached = Path(torch.hub.get_dir(), "checkpoints", Path(enum[weights].url).name)
        message = f"cannot download {arch} weights {weights} ({err}); put it at {cached}"
        raise OSError(message) from err


def build_backbone(arch: str, num_classes: int, in_channels: int = 3, weights=None) -> nn.Module:
    """A backbone of ``MODELS``, random or with ``load_weights`` (a new ``fc`` if c differs)."""
    if arch not in MODELS:
        raise UsageError(f"unknown model {arch!r}; choose one of: {', '.join(sorted(MODELS))}")
    if weights is None:
        return MODELS[arch](num_classes, in_channels)
    state = load_weights(arch, weights)
    if "fc.weight" not in state:
        raise UsageError(f"weights {weights!r} have no 'fc.weight': not a {arch} state dict")
    model = MODELS[arch](state["fc.weight"].shape[0], in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        summary = " ".join(str(err).split())[:300]
        raise UsageError(f"weights {weights!r} do not fit {arch}: {summary}") from None
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_network(arch: str, num_classes: int, mean, std, weights=None) -> nn.Sequential:
    """``Sequential(NormalizeLayer(mean, std), backbone)``: pixels ``(B, C, H, W)`` -> logits."""
    backbone = build_backbone(arch, num_classes, len(mean), weights)
    return nn.Sequential(NormalizeLayer(mean, std), backbone)
