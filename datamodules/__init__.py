"""Datamodules: pixels in [0, 1], ``num_classes``, ``mean`` and ``std`` for the model."""

from datamodules.base import ImageClassificationDataModule
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagenet import ImageNetDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageNetDataModule"]
__all__ += ["ImageClassificationDataModule"]
