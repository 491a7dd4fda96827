"""Shared fixtures: the authors' reference files, offline W&B."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "cifar10_resnet110_sigma0.25"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' CIFAR-10 counts and radii (kept outside the repository)."""
    if not (REFERENCE / "counts.txt").is_file():
        pytest.skip(f"reference data not found at {REFERENCE} (it lives in ../shared/reference)")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_counts(reference_dir):
    table = np.loadtxt(reference_dir / "counts.txt", dtype=np.int64)
    return table[:, :-1], table[:, -1]


@pytest.fixture(scope="session")
def reference_radii_top3(reference_dir):
    return np.loadtxt(reference_dir / "radii_top3_alpha0.001.txt", skiprows=1)[:, 1]
