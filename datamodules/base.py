"""What datamodules share: loaders, validation splits and the hyperparameters they save."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset

from certify.math.validation import UsageError


def split_off_validation(train_set, eval_transform, seed: int, size: int = 0, per_class: int = 0):
    """``(train, val)`` subsets: ``size`` images, or ``per_class`` of every class, for ``val``."""
    labels, rng = np.asarray(train_set.targets), np.random.default_rng(seed)
    if size >= len(labels):
        raise UsageError(f"val_size {size} leaves none of the {len(labels)} training images")
    if size:
        val = rng.permutation(len(labels))[:size]
    else:
        classes, sizes = np.unique(labels, return_counts=True)
        if per_class >= sizes.min():
            name, least = train_set.classes[classes[sizes.argmin()]], sizes.min()
            raise UsageError(f"class {name!r} has {least} training images: "
                             f"val_per_class {per_class} leaves none for training")  # fmt: skip
        val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                              for c in classes])  # fmt: skip
    train = np.setdiff1d(np.arange(len(labels)), val)
    evaluated = copy.copy(train_set)  # the same files and arrays, another transform
    evaluated.transform = eval_transform
    return Subset(train_set, train.tolist()), Subset(evaluated, sorted(val.tolist()))


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{what} {str(path)!r} is not a directory")
    return path


class Indexed(Dataset):
    """``dataset``'s ``(x, y)`` with the example's index: ``(x, y, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index][:2], index)


class ImageClassificationDataModule(LightningDataModule):
    """Subclasses set ``num_classes``, ``mean``, ``std``, ``data_kind`` (``mnist``, ``cifar10`` or
    ``imagenet``: the published recipe closest to the data) and build the datasets in ``setup``.

    The validation and test loaders yield ``(x, y, index)``; under torch.distributed each
    process takes every world-size-th example, none repeated (the shards may differ by one).
    """

    data_kind = "cifar10"

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.save_hyperparameters(frame=inspect.currentframe().f_back)
        for key, value in self.hparams.items():  # builtin ints: checkpoints load weights-only
            if isinstance(value, int) and not isinstance(value, bool):
                self.hparams[key] = int(value)  # not jsonargparse's PositiveInt
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.train_dataset = self.val_dataset = self.test_dataset = None

    def _loader(self, dataset: Dataset, shuffle: bool = False, sampler=None) -> DataLoader:
        workers, pin = self.num_workers, torch.cuda.is_available()  # keywords: DDP rebuilds it
        kwargs = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)
        kwargs.update(batch_size=self.batch_size, shuffle=shuffle, sampler=sampler)
        return DataLoader(dataset, **kwargs)

    def _evaluation_loader(self, dataset: Dataset) -> DataLoader:
        """Lightning keeps a loader's own DistributedSampler: this one does not pad."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and len(dataset) < (world := torch.distributed.get_world_size()):
            raise UsageError(f"{len(dataset)} evaluation examples for {world} processes: every "
                             "process needs at least one (use fewer devices)")  # fmt: skip
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False) if distributed else None
        return self._loader(Indexed(dataset), sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.test_dataset)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset)
