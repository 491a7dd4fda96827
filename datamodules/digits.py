"""scikit-learn's bundled 8x8 digits: the embedded default data set (no download, CPU-sized)."""

from __future__ import annotations

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from datamodules.base import ImageClassificationDataModule


class DigitsDataset(TensorDataset):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, int(label)  # (1, 8, 8), int


def seeded_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(0.6 * n), round(0.2 * n)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's 1797 8x8 digits, ``(1, 8, 8)`` in [0, 1], in seeded 1078 / 359 / 360 splits.

    Args:
        batch_size: examples per batch and per process.
        num_workers: loader worker processes (0: the data is in memory).
        split_seed: seed of the train / val / test split.
    """

    num_classes = 10
    data_kind = "mnist"
    mean = (0.3053,)  # of all 1797 images, pixel / 16
    std = (0.3760,)

    def __init__(
        self, batch_size: PositiveInt = 64, num_workers: NonNegativeInt = 0, split_seed: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.int64)  # (1797,)
        splits = seeded_split(len(labels), self.split_seed)
        self.train_dataset, self.val_dataset, self.test_dataset = (
            DigitsDataset(images[i], labels[i]) for i in splits
        )  # (1078 | 359 | 360, 1, 8, 8)
