"""Data sets in torchvision's on-disk formats, generated: for tests and GPU checks, no download."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def write_cifar10(root: Path, train_per_batch: int = 4, test_size: int = 12, seed: int = 0):
    """Write ``cifar-10-batches-py`` as the official archive lays it out: five training pickles,
    one test pickle (dicts with ``data``, uint8 rows of 3072 = R, G, B planes of 32x32, and
    ``labels``) and ``batches.meta``. Returns the test images ``(N, 3, 32, 32)`` and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def write(name: str, n: int):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        filenames = [f"{name}_{i}.png" for i in range(n)]
        entry = {"batch_label": name, "data": data, "labels": labels, "filenames": filenames}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file, protocol=2)
        return data.reshape(n, 3, 32, 32), np.asarray(labels)

    for i in range(1, 6):
        write(f"data_batch_{i}", train_per_batch)
    test = write("test_batch", test_size)
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": train_per_batch, "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump(meta, file, protocol=2)
    return test
