"""What every datamodule shares: loaders, and the attributes the model and certification read.

A datamodule exposes ``num_classes``, ``mean`` and ``std`` (per channel, for the model's
normalisation layer) from ``__init__`` on, so the CLI can link them into the model. After
``setup``, ``train_dataset``, ``val_dataset`` and ``test_dataset`` return ``(image, label)``
with ``image`` a float tensor ``(C, H, W)`` in [0, 1] (never normalised) and ``label`` an int,
at stable indices (certification picks a fixed subset by index).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset


class ArrayDataset(Dataset):
    """In-memory ``(image, int label)`` pairs from a ``(N, C, H, W)`` tensor and ``(N,)`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images  # (N, C, H, W)
        self.labels = labels  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])  # (C, H, W), int


class DataSplitError(ValueError):
    """A validation split the data cannot give (one-line message)."""


def holdout_split(
    labels: Sequence[int], seed: int, size: int = 0, per_class: int = 0, classes=None
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(train, val)`` indices: ``size`` examples, or ``per_class`` of every class, drawn
    with ``seed`` for validation; the rest for training. ``classes`` names the labels.

    Raises:
        DataSplitError: the split would leave no training example (of some class).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if size:
        if size >= len(labels):
            raise DataSplitError(
                f"val_size {size} leaves none of the {len(labels)} training images"
            )
        val = rng.permutation(len(labels))[:size]
    else:
        val = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if per_class >= len(members):
                name = repr(classes[label]) if classes is not None else int(label)
                raise DataSplitError(
                    f"class {name} has {len(members)} training images: val_per_class "
                    f"{per_class} leaves none for training (lower data.val_per_class)"
                )
            val.append(rng.permutation(members)[:per_class])
        val = np.concatenate(val) if val else np.zeros(0, dtype=np.int64)
    val = np.sort(val).astype(np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of a torchvision dataset (same files, same arrays) with another transform."""
    other = copy.copy(dataset)
    other.transform = transform
    return other


def split_off_validation(train_set: Dataset, eval_transform, labels, seed: int, **amount):
    """``(train, val)`` subsets of ``train_set``: the validation images are seen with
    ``eval_transform`` and never trained on (``holdout_split``)."""
    train, val = holdout_split(labels, seed, classes=getattr(train_set, "classes", None), **amount)
    evaluated = with_transform(train_set, eval_transform)
    return Subset(train_set, train.tolist()), Subset(evaluated, val.tolist())


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a ``Path`` if it is a directory, else a one-line ``FileNotFoundError``."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {str(path)!r} is not a directory")
    return path


class ImageClassificationDataModule(LightningDataModule):
    """Base class: subclasses set ``num_classes``, ``mean`` and ``std``, and build datasets in
    ``setup``.

    Args:
        batch_size: examples per batch and per process (with DDP the global batch is
            ``batch_size * devices * num_nodes``).
        num_workers: data-loading worker processes per training process.
    """

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
