"""CIFAR-10 through torchvision, in [0, 1] pixels (the model normalises)."""

from __future__ import annotations

from pathlib import Path

from jsonargparse.typing import NonNegativeInt, PositiveInt
from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from certify.math.validation import UsageError
from datamodules.base import ImageClassificationDataModule, require_dir, split_off_validation


class UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 without its md5 comparison (made once at start-up instead)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: 50k training images (random crop, flip) less ``val_size``; 10k test images.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py/``.
        download: fetch the archive into ``data_dir`` if missing (needs the network).
        verify_md5: check the files against the official md5 sums (off: a copy made on purpose).
        val_size: training images held out for validation (0: validate on the test split).
        split_seed: seed of the choice of validation images.
        batch_size: examples per batch and per process.
        num_workers: loader worker processes per training process.
    """

    num_classes = 10
    data_kind = "cifar10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = False,
        verify_md5: bool = True,
        val_size: NonNegativeInt = 5000,
        split_seed: int = 0,
        batch_size: PositiveInt = 256,
        num_workers: NonNegativeInt = 4,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if val_size >= 50_000:
            raise UsageError(f"val_size {val_size} leaves none of the 50000 training images")
        self.root, self.download = Path(data_dir).expanduser(), download
        self.val_size, self.split_seed = int(val_size), split_seed
        if download:
            return
        folder = require_dir(self.root, "CIFAR-10 data_dir") / CIFAR10.base_folder
        meta = CIFAR10.meta
        files = [*CIFAR10.train_list, *CIFAR10.test_list, (meta["filename"], meta["md5"])]
        missing = [name for name, _ in files if not (folder / name).is_file()]
        if missing:
            raise UsageError(f"CIFAR-10 data_dir {str(self.root)!r} lacks {CIFAR10.base_folder}/"
                             f"{', '.join(missing)} (set download: true to fetch it)")  # fmt: skip
        if verify_md5 and (bad := [n for n, md5 in files if not check_integrity(folder / n, md5)]):
            raise UsageError(f"CIFAR-10 files in {str(folder)!r} do not match torchvision's md5 "
                             f"sums: {', '.join(bad)} (download again, or set verify_md5: false "
                             "for a re-made copy)")  # fmt: skip

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                CIFAR10(self.root, train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        evaluation = transforms.ToTensor()
        train_tf = transforms.Compose([*augment, evaluation])
        self.test_dataset = self.val_dataset = UncheckedCIFAR10(self.root, False, evaluation)
        if self.val_size or stage in (None, "fit"):
            self.train_dataset = UncheckedCIFAR10(self.root, True, train_tf)
            if self.val_size:
                self.train_dataset, self.val_dataset = split_off_validation(
                    self.train_dataset, evaluation, self.split_seed, size=self.val_size
                )
