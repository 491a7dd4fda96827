"""CIFAR-10 through torchvision, in [0, 1] pixels (the model normalises)."""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from certify.math.validation import check_int
from datamodules.base import ImageClassificationDataModule, require_dir, split_off_validation

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # Cohen et al.'s normalisation constants
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class UncheckedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 with its md5 sums dropped: files are required, contents unchecked.

    The parsing is torchvision's own (the ``cifar-10-batches-py`` pickles, ``batches.meta``);
    only the comparison with the md5 sums of the official files is skipped. For copies that
    differ byte-wise from the official archive (re-pickled, or generated for tests).
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def check_cifar10_files(root: Path, verify_md5: bool) -> None:
    """Raise a one-line error naming the CIFAR-10 files missing (or corrupt) under ``root``."""
    files = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], None]]
    folder = root / CIFAR10.base_folder
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 data_dir {str(root)!r} lacks {CIFAR10.base_folder}/{', '.join(missing)} "
            "(set download: true to fetch it)"
        )
    if verify_md5:
        meta = [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]
        bad = [name for name, md5 in (*files[:-1], meta) if not check_integrity(folder / name, md5)]
        if bad:
            raise ValueError(
                f"CIFAR-10 files in {str(folder)!r} do not match torchvision's md5 sums: "
                f"{', '.join(bad)} (download again, or set verify_md5: false for a re-made copy)"
            )


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: train and validate on the 50k training images, test on the 10k test images.

    ``val_size`` training images (drawn with ``split_seed``) are held out for validation: model
    selection and live certification never see the test split. ``val_size: 0`` trains on all
    50k images, as the published recipes do, and then validates on the test split.

    Training images get a random 32x32 crop (padding 4) and a horizontal flip; validation and
    test images are untouched. No ``Normalize``: tensors stay in [0, 1] and the model
    normalises.

    Args:
        data_dir: the folder holding ``cifar-10-batches-py/``.
        val_size: training images held out for validation (0: validate on the test split).
        split_seed: seed of the choice of validation images.
        download: fetch the archive into ``data_dir`` if missing (needs the network).
        verify_md5: check the files against torchvision's md5 sums of the official archive at
            start-up. Turn off only for a copy made on purpose (the parsing is the same).
        batch_size: examples per batch and per process.
        num_workers: loader worker processes per training process.
    """

    num_classes = 10
    mean = CIFAR10_MEAN
    std = CIFAR10_STD

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = False,
        verify_md5: bool = True,
        val_size: int = 5000,
        split_seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.val_size, self.split_seed = check_int(val_size, "val_size", low=0), split_seed
        if val_size >= 50_000:
            raise ValueError(f"val_size {val_size} leaves none of the 50000 training images")
        self.root = Path(data_dir).expanduser()
        self.download = download
        self.verify_md5 = verify_md5
        if not download:
            check_cifar10_files(require_dir(self.root, "CIFAR-10 data_dir"), verify_md5)

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10(self.root, train=True, download=True)
            CIFAR10(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        # md5 sums were checked once at start-up (or by the download): parse without re-hashing.
        train_tf = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
        evaluation = transforms.ToTensor()
        self.test_dataset = UncheckedCIFAR10(self.root, train=False, transform=evaluation)
        if not self.val_size:
            self.val_dataset = self.test_dataset
            if stage in (None, "fit"):
                self.train_dataset = UncheckedCIFAR10(self.root, train=True, transform=train_tf)
            return
        train_set = UncheckedCIFAR10(self.root, train=True, transform=train_tf)
        self.train_dataset, self.val_dataset = split_off_validation(
            train_set, evaluation, train_set.targets, self.split_seed, size=self.val_size
        )
