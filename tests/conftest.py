"""Shared fixtures: the authors' reference files (``tests/data``), offline W&B."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic_data import write_cifar10

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "cifar10_resnet110_sigma0.25"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The authors' CIFAR-10 counts and radii (``tests/data/README.md`` names the source)."""
    return REFERENCE


@pytest.fixture(scope="session")
def reference_counts(reference_dir):
    table = np.loadtxt(reference_dir / "counts.txt", dtype=np.int64)
    return table[:, :-1], table[:, -1]


@pytest.fixture(scope="session")
def reference_radii_top3(reference_dir):
    return np.loadtxt(reference_dir / "radii_top3_alpha0.001.txt", skiprows=1)[:, 1]


# ----------------------------------------------------------------------------- training
CONFIGS = REPO / "configs"


@pytest.fixture
def isolated_run(tmp_path, monkeypatch):
    """Run in a fresh temporary directory, offline, with torch hub and W&B files kept inside it.

    Lightning's ``seed_everything`` sets environment variables: all of them are restored.
    """
    saved = dict(os.environ)
    monkeypatch.chdir(tmp_path)
    os.environ.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / ".wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / ".wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / ".wandb-data"),
        TORCH_HOME=str(tmp_path / "torch-home"),
    )
    yield tmp_path
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:  # a run left open would be reused by the next test's logger
            wandb.finish()
        wandb.teardown()  # W&B's process-wide settings remember this directory: forget them
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def seed_torch_hub(isolated_run):
    """``seed(arch, weights_name)``: write a random state dict where torchvision caches ``arch``'s
    weights, ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``, and return it.

    torch.hub checks the hash prefix of the file name only while downloading; a cached file is
    loaded as it is, so no network is needed.
    """
    import torch
    import torchvision

    def seed(arch: str, weights_name: str) -> dict:
        member = torchvision.models.get_model_weights(arch)[weights_name]
        torch.manual_seed(1)
        model = torchvision.models.get_model(arch, num_classes=len(member.meta["categories"]))
        state = model.state_dict()
        path = isolated_run / "torch-home" / "hub" / "checkpoints" / Path(member.url).name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return state

    return seed


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """``(root, test_images, test_labels)`` of a small CIFAR-10 copy in torchvision's format."""
    root = tmp_path_factory.mktemp("cifar10")
    images, labels = write_cifar10(root)
    return root, images, labels


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    """A tiny ImageFolder tree of JPEGs: ``train/`` (6 classes x 3) and ``val/`` (6 x 1)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 1)):
        for cls in ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                height, width = rng.integers(40, 90, size=2)
                pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}_{i}.JPEG", format="JPEG")
    return root


@pytest.fixture
def lightning_cli():
    """``cli(*args, run=True)``: ``TopkLightningCLI`` in this process, on the given arguments."""
    from lightning_modules.cli import TopkLightningCLI

    def cli(*args: str, run: bool = True):
        return TopkLightningCLI(args=[str(a) for a in args], run=run)

    return cli


def parse_init(cls, *args: str):
    """``cls`` made as the CLI makes it: ``--NAME value`` arguments checked against the type
    hints of its ``__init__`` (a bad value raises jsonargparse's ``ArgumentError``)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init")
    config = parser.parse_args([a.replace("--", "--init.", 1) for a in args])
    return parser.instantiate(config).init


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A digits_cnn trained for a few epochs under noise, saved as a Lightning checkpoint."""
    import pytorch_lightning as pl
    import torch

    from datamodules import DigitsDataModule
    from lightning_modules import NoisyClassifier

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = NoisyClassifier(
        "digits_cnn", data.num_classes, data.mean, data.std, sigma=0.25,
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        lr_scheduler=None,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, data)
    path = tmp_path_factory.mktemp("digits_checkpoint") / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path


def pytest_collection_modifyitems(config, items):
    from tests.console import SELECTED

    config.stash[SELECTED] = items  # what runs, for tests that start a process ahead of time
