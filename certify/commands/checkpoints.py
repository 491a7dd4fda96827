"""Weights for certification: our Lightning checkpoints and Cohen et al.'s released models.

Cohen, Rosenfeld and Kolter (2019, locuslab/smoothing) released ``torch.save`` dicts with
``arch`` (``cifar_resnet20``, ``cifar_resnet110`` or ``resnet50``), ``state_dict`` and
optimizer state. Their classifier is ``Sequential(NormalizeLayer, backbone)`` whose
normalisation has no state, so the state dict holds the backbone under ``1.``; the ImageNet
ResNet-50 was wrapped in ``DataParallel``, giving ``1.module.``. Our networks are
``Sequential(NormalizeLayer, backbone)`` too, so their weights load after removing
``module.``. Our Lightning checkpoints keep the network under ``net.``.

Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only. Both formats load that way (their optimizer state is plain data, in the zip
and in the legacy format alike); a file that holds pickled Python objects is refused unless
the user trusts it (``TRUST_OPTION``), since unpickling can run any code.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

#: Cohen et al.'s ``arch`` names and the normalisation their models were trained with.
COHEN_NORMALIZATION = {
    "cifar_resnet20": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar_resnet110": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "resnet50": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with the configured model (one-line message)."""


#: The option that lets a checkpoint holding pickled Python objects be loaded.
TRUST_OPTION = "--trust_checkpoint true"
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """The checkpoint's contents, read with ``torch.load(weights_only=True)`` unless ``trust``.

    A file that needs unpickling (Python objects, whose loading can run any code) is refused
    with a one-line ``CheckpointError`` naming ``TRUST_OPTION``; with ``trust=True`` it is
    loaded with ``weights_only=False``: only for a file from a trusted source.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust:
            raise CheckpointError(
                f"checkpoint {str(path)!r} cannot be read: {_reason(err)}"
            ) from None
        inner = " ".join(str(err.__context__ or err).split())
        found = _GLOBAL.search(inner)
        if found:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds pickled Python objects ({found.group(1)}), "
                f"whose loading can run any code: refused; if you trust the file, pass "
                f"{TRUST_OPTION}"
            ) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: not a checkpoint, or one that holds "
            f"pickled Python objects (UnpicklingError: {inner[:80]}); only if you trust the "
            f"file, pass {TRUST_OPTION}"
        ) from None
    except Exception as err:  # noqa: BLE001 - text, truncated or empty files fail in many ways
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    """``KeyError: 101`` rather than a bare ``101``; the type alone for an empty message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def network_state(checkpoint: dict, path: str | Path, arch: str | None) -> tuple[dict, str]:
    """The state dict of ``Sequential(NormalizeLayer, backbone)`` and the format's name."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds no state_dict")
    state = checkpoint["state_dict"]
    if "arch" in checkpoint:  # Cohen et al.
        if arch is not None and checkpoint["arch"] != arch:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {checkpoint['arch']}, the config builds a {arch}"
            )
        return {key.replace("1.module.", "1.", 1): value for key, value in state.items()}, "cohen"
    saved_arch = (checkpoint.get("hyper_parameters") or {}).get("arch")
    if arch is not None and saved_arch is not None and saved_arch != arch:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {saved_arch}, the config builds a {arch}"
        )
    net = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    if not net:
        raise CheckpointError(f"checkpoint {str(path)!r} has no weights under 'net.'")
    return net, "lightning"


def fitting_network_state(
    net: nn.Module, path: str | Path, arch: str | None = None, trust: bool = False
) -> tuple[dict, str]:
    """The checkpoint's network weights and format, checked against ``net`` (nothing loaded).

    ``trust``: read a file that holds pickled Python objects (``read_checkpoint``).

    Raises:
        CheckpointError: missing, unreadable or untrusted file, another architecture, another
            number of classes, or missing/unexpected weights.
    """
    state, kind = network_state(read_checkpoint(path, trust), path, arch)
    own = net.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit the model: {key} has shape "
                f"{tuple(value.shape)} in the checkpoint, {tuple(own[key].shape)} in the model"
                + (" (another number of classes)" if key.endswith("fc.weight") else "")
            )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model ({detail}): another architecture?"
        )
    return state, kind


def load_network_weights(
    net: nn.Module, path: str | Path, arch: str | None = None, trust: bool = False
) -> str:
    """Load a checkpoint of either format into ``net``; returns ``"lightning"`` or ``"cohen"``.

    Raises:
        CheckpointError: as :func:`fitting_network_state`.
    """
    state, kind = fitting_network_state(net, path, arch, trust)
    net.load_state_dict(state)
    if kind == "cohen":
        mean, std = COHEN_NORMALIZATION.get(arch or "", (None, None))
        normalize = net[0] if isinstance(net, nn.Sequential) else None
        if mean is not None and normalize is not None and hasattr(normalize, "mean"):
            normalize.mean.copy_(torch.tensor(mean).view_as(normalize.mean))
            normalize.std.copy_(torch.tensor(std).view_as(normalize.std))
    return kind
