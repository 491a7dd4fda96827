"""Options of the sampler's forward pass, checked before anything runs."""

from __future__ import annotations

import logging

import torch

from certify.math.validation import UsageError

#: Reduced precisions of the sampler's forward pass by name (``None``: the model's own).
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(autocast: str | None) -> torch.dtype | None:
    """The dtype named by ``autocast`` (``"bf16"``, ``"fp16"`` or ``None``)."""
    if not isinstance(autocast, (str, type(None))) or autocast not in AUTOCAST_DTYPES:
        raise UsageError(f"autocast must be 'bf16' or 'fp16', got {autocast!r}")
    return AUTOCAST_DTYPES[autocast]


def check_compile(device: torch.device | str) -> None:
    """One-line ``UsageError`` if ``torch.compile`` cannot build for ``device`` (no C++ compiler,
    no Triton): a tiny function is compiled, caches off, before a run writes anything."""
    import torch._inductor.config as inductor_config

    device = torch.device(device)

    def probe(t: torch.Tensor) -> torch.Tensor:
        return t * 2 + 1

    quiet = logging.getLogger("torch._inductor.utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with inductor_config.patch(force_disable_caches=True):
            torch.compile(probe, dynamic=False)(torch.ones(8, device=device))
    except Exception as err:  # BackendCompilerFailed, InvalidCxxCompiler, missing Triton...
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        raise UsageError(
            f"compile is on but torch.compile fails on {device.type}: {reason}"
        ) from None
    finally:
        quiet.setLevel(level)
