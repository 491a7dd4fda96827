"""scikit-learn's bundled 8x8 digits: the embedded default data set (no download, CPU-sized)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from datamodules.base import ArrayDataset, ImageClassificationDataModule

#: Fractions of the 1797 images in the train, val and test splits.
SPLIT = (0.6, 0.2, 0.2)


def seeded_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, val and test splits of ``n`` examples: a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = round(SPLIT[0] * n), round(SPLIT[1] * n)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


class DigitsDataModule(ImageClassificationDataModule):
    """The 1797 8x8 grey-level digits of ``sklearn.datasets.load_digits``, pixels / 16 in [0, 1].

    A fixed split, 60 / 20 / 20 % (1078 / 359 / 360 images), drawn by ``split_seed``; the order
    of each split is the order of the permutation, so indices are stable. Images are
    ``(1, 8, 8)`` float32 tensors.

    Args:
        batch_size: examples per batch.
        num_workers: loader worker processes (0: the data is in memory).
        split_seed: seed of the train / val / test split.
    """

    num_classes = 10
    mean = (0.3053,)  # of all 1797 images, pixel / 16
    std = (0.3760,)

    def __init__(self, batch_size: int = 64, num_workers: int = 0, split_seed: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.split_seed = split_seed

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.int64)  # (N,)
        train, val, test = seeded_split(len(labels), self.split_seed)
        self.train_dataset = ArrayDataset(images[train], labels[train])  # (1078, 1, 8, 8)
        self.val_dataset = ArrayDataset(images[val], labels[val])  # (359, 1, 8, 8)
        self.test_dataset = ArrayDataset(images[test], labels[test])  # (360, 1, 8, 8)
