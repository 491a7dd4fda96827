"""ImageNet (or any class-per-folder image tree) through torchvision's ImageFolder."""

from __future__ import annotations

from jsonargparse.typing import NonNegativeInt, PositiveInt
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from certify.math.validation import UsageError
from datamodules.base import ImageClassificationDataModule, require_dir, split_off_validation


def image_folder(path, transform) -> ImageFolder:
    try:  # a class folder without images: one line naming the folder
        return ImageFolder(path, transform=transform)
    except FileNotFoundError as err:
        raise UsageError(f"ImageNet folder {str(path)!r}: {err}") from None


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet as ImageFolder trees ``data_dir/{train,val}/<class>/<image>``, ``val/`` for tests.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        val_per_class: training images of each class held out for validation (0: ``val/``).
        split_seed: seed of the choice of validation images.
        batch_size: examples per batch and per process.
        num_workers: loader worker processes per training process.
    """

    data_kind = "imagenet"
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        data_dir: str,
        val_per_class: NonNegativeInt = 10,
        split_seed: int = 0,
        batch_size: PositiveInt = 256,
        num_workers: NonNegativeInt = 8,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.val_per_class, self.split_seed = int(val_per_class), split_seed
        root = require_dir(data_dir, "ImageNet data_dir")
        self.train_dir = require_dir(root / "train", "ImageNet train folder")
        self.val_dir = require_dir(root / "val", "ImageNet val folder")
        classes, val_classes = find_classes(self.train_dir)[0], find_classes(self.val_dir)[0]
        if classes != val_classes:
            odd = ", ".join(sorted(set(classes) ^ set(val_classes))[:3])
            raise UsageError(f"ImageNet train/ and val/ have different class folders "
                             f"({len(classes)} vs {len(val_classes)}; e.g. {odd})")  # fmt: skip
        self.classes, self.num_classes = classes, len(classes)

    def setup(self, stage: str | None = None) -> None:
        crop = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
        train_tf = transforms.Compose([*crop, transforms.ToTensor()])
        eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                      transforms.ToTensor()])  # fmt: skip
        self.test_dataset = image_folder(self.val_dir, eval_tf)
        self.val_dataset = None if self.val_per_class else self.test_dataset
        # train/ is read when training, or for the held-out validation images.
        if stage in (None, "fit") or (stage == "validate" and self.val_per_class):
            self.train_dataset = image_folder(self.train_dir, train_tf)
            if self.val_per_class:
                self.train_dataset, self.val_dataset = split_off_validation(
                    self.train_dataset, eval_tf, self.split_seed, per_class=self.val_per_class
                )
