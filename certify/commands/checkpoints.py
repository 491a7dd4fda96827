"""Our Lightning checkpoints and Cohen et al.'s (docs/commands.md#checkpoints), read weights
only: pickled Python objects can run any code when loaded."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from certify.math.validation import UsageError
from datamodules import CIFAR10DataModule, ImageNetDataModule

#: Cohen et al.'s ``arch`` names and the data whose normalisation their models were trained with.
COHEN_DATA = {"cifar_resnet20": CIFAR10DataModule, "cifar_resnet110": CIFAR10DataModule,
              "resnet50": ImageNetDataModule}  # fmt: skip


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """``torch.load(path, weights_only=not trust)``; a file it cannot read: ``UsageError``."""
    name = repr(str(path))
    if not Path(path).is_file():
        what = "is a directory, not a checkpoint file" if Path(path).is_dir() else "does not exist"
        raise UsageError(f"checkpoint {name} {what}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # noqa: BLE001 - text, truncated or empty files fail in many ways
        pickled = isinstance(err, pickle.UnpicklingError) and not trust
        inner = " ".join(str(err.__context__ or err if pickled else err).split())
        if pickled and (found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", inner)):
            problem = (f"holds pickled Python objects ({found.group(1)}), whose loading can "
                       "run any code: refused; if you trust the file, pass "
                       "--trust_checkpoint true")  # fmt: skip
        elif pickled:
            problem = ("cannot be read: not a checkpoint, or one that holds pickled Python "
                       f"objects (UnpicklingError: {inner[:80]}); only if you trust the file, "
                       "pass --trust_checkpoint true")  # fmt: skip
        else:
            problem = f"cannot be read: {type(err).__name__}" + (f": {inner}" if inner else "")
        raise UsageError(f"checkpoint {name} {problem}") from None


def network_state(checkpoint: dict, path: str | Path, arch: str | None,
                  net: nn.Module | None = None) -> tuple[dict, str]:  # fmt: skip
    """``(state dict for net, "lightning" or "cohen")``; one that does not fit: ``UsageError``."""
    name = f"checkpoint {str(path)!r}"
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UsageError(f"{name} holds no state_dict")
    state = checkpoint["state_dict"]
    saved_arch = checkpoint.get("arch") or (checkpoint.get("hyper_parameters") or {}).get("arch")
    if arch is not None and saved_arch is not None and saved_arch != arch:
        raise UsageError(f"{name} holds a {saved_arch}, the config builds a {arch}")
    kind = "cohen" if "arch" in checkpoint else "lightning"
    if kind == "cohen":  # the backbone under ``1.`` or ``1.module.``
        state = {k.replace("1.module.", "1.", 1): v for k, v in state.items()}
    elif not (state := {k[4:]: v for k, v in state.items() if k.startswith("net.")}):
        raise UsageError(f"{name} has no weights under 'net.'")
    own = net.state_dict() if net is not None else state
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            hint = " (another number of classes)" if key.endswith("fc.weight") else ""
            saved, built = tuple(value.shape), tuple(own[key].shape)
            raise UsageError(f"{name} does not fit the model: {key} has shape {saved} in the "
                             f"checkpoint, {built} in the model{hint}")  # fmt: skip
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UsageError(f"{name} does not fit the model ({detail}): another architecture?")
    return state, kind


def load_network_weights(net: nn.Module, path: str | Path, arch: str | None = None,
                         trust: bool = False) -> str:  # fmt: skip
    """Load a checkpoint of either format into ``net``; returns ``"lightning"`` or ``"cohen"``."""
    state, kind = network_state(read_checkpoint(path, trust), path, arch, net)
    net.load_state_dict(state)
    normalize = net[0] if isinstance(net, nn.Sequential) else None
    if kind == "cohen" and arch in COHEN_DATA and hasattr(normalize, "mean"):
        normalize.mean.copy_(torch.tensor(COHEN_DATA[arch].mean).view_as(normalize.mean))
        normalize.std.copy_(torch.tensor(COHEN_DATA[arch].std).view_as(normalize.std))
    return kind
