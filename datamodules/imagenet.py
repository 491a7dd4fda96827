"""ImageNet (or any class-per-folder image tree) through torchvision's ImageFolder."""

from __future__ import annotations

from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from certify.math.validation import check_int
from datamodules.base import ImageClassificationDataModule, require_dir, split_off_validation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetDataModule(ImageClassificationDataModule):
    """An ImageFolder tree ``data_dir/{train,val}/<class>/<image>``; ``val/`` is the test split.

    ``val_per_class`` images of every class of ``train/`` (drawn with ``split_seed``) are held
    out for validation, seen with the evaluation transforms and never trained on: model
    selection and live certification never see ``val/``, which ``test`` and ``certify`` use
    (ImageNet's official validation set is the usual test set). ``val_per_class: 0`` trains on
    all of ``train/`` and validates on ``val/``, as the published recipes do.

    Training: RandomResizedCrop 224 and a horizontal flip; evaluation: Resize 256 and
    CenterCrop 224. Tensors in [0, 1], no ``Normalize`` (the model normalises). ``num_classes``
    is the number of class folders in ``train/``; ``val/`` must have the same classes.

    Args:
        data_dir: the folder holding ``train/`` and ``val/``.
        val_per_class: training images of each class held out for validation (0: validate on
            ``val/``).
        split_seed: seed of the choice of validation images.
        batch_size: examples per batch and per process.
        num_workers: loader worker processes per training process.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(
        self,
        data_dir: str,
        val_per_class: int = 10,
        split_seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 8,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.val_per_class = check_int(val_per_class, "val_per_class", low=0)
        self.split_seed = split_seed
        root = require_dir(data_dir, "ImageNet data_dir")
        self.train_dir = require_dir(root / "train", "ImageNet train folder")
        self.val_dir = require_dir(root / "val", "ImageNet val folder")
        classes, _ = find_classes(self.train_dir)  # FileNotFoundError if there is no class
        val_classes, _ = find_classes(self.val_dir)
        if classes != val_classes:
            odd = sorted(set(classes) ^ set(val_classes))
            raise ValueError(
                f"ImageNet train/ and val/ have different class folders ({len(classes)} vs "
                f"{len(val_classes)}; e.g. {', '.join(odd[:3])})"
            )
        self.classes = classes
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]
        )
        eval_tf = transforms.Compose(
            [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
        )
        # train/ is read when training, or for the held-out validation images.
        need_train = stage in (None, "fit") or (stage == "validate" and self.val_per_class > 0)
        train_set = image_folder(self.train_dir, "train", train_tf) if need_train else None
        self.test_dataset = image_folder(self.val_dir, "val", eval_tf)
        if not self.val_per_class:
            self.val_dataset = self.test_dataset
            if train_set is not None:
                self.train_dataset = train_set
        elif train_set is not None:
            self.train_dataset, self.val_dataset = split_off_validation(
                train_set, eval_tf, train_set.targets, self.split_seed, per_class=self.val_per_class
            )


def image_folder(path, split: str, transform) -> ImageFolder:
    """torchvision's ``ImageFolder``; its error for a class folder without images names the
    folder (torchvision names only the classes)."""
    try:
        return ImageFolder(path, transform=transform)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"ImageNet {split} folder {str(path)!r}: {err}") from None
