"""A folder of image files as inputs of ``predict``, through the data set's own transforms."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from certify.commands.settings import CertifySettingsError


class ImageFileError(CertifySettingsError):
    """An image file that cannot be an input of the model (one line, exit status 2)."""


def evaluation_transform(dataset: Dataset):
    """The transform of a torchvision data set (``ImageFolder``, ``CIFAR10``), looked up through
    ``Subset`` wrappers; ``ToTensor`` for in-memory data sets (the digits) that have none."""
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    return transform if transform is not None else transforms.ToTensor()


class FolderImages(Dataset):
    """Every image file under ``folder`` (recursively, sorted by relative path) as
    ``(image, -1)``: the label is unknown. Images are read as grey-level or RGB (as the data
    set's ``shape`` has 1 or 3 channels) and go through ``transform``, which must give tensors
    of ``shape``.

    Example ids: the position in the sorted list, so the noise of a file is the same in every
    run over the same folder.
    """

    def __init__(self, folder: str | Path, transform, shape: tuple[int, ...]) -> None:
        self.root = Path(folder).expanduser()
        if not self.root.is_dir():
            raise ImageFileError(f"images {str(folder)!r} is not a directory")
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise ImageFileError(
                f"images {str(folder)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})"
            )
        self.transform, self.shape = transform, tuple(shape)
        self.mode = {1: "L", 3: "RGB"}.get(self.shape[0])
        if self.mode is None:
            raise ImageFileError(
                f"images: the data set's inputs have {self.shape[0]} channels; image files "
                "give 1 (grey) or 3 (RGB)"
            )

    def name(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def identity(self) -> dict:
        """The folder and a digest of its files' names and contents (for the settings file):
        a file changed in place is another input, and a run over it another run."""
        digest = hashlib.sha256()
        for i, path in enumerate(self.files):
            try:
                content = path.read_bytes()
            except OSError as err:
                reason = err.strerror or type(err).__name__
                raise ImageFileError(f"image {self.name(i)!r} cannot be read ({reason})") from None
            digest.update(f"{self.name(i)}\0{len(content)}\n".encode())
            digest.update(hashlib.sha256(content).digest())
        return {
            "folder": str(self.root.resolve()),
            "files": len(self.files),
            "sha256": digest.hexdigest(),
        }

    def check(self) -> None:
        """Read every image once: a file that cannot be an input is refused before any output
        is written."""
        for index in range(len(self)):
            self[index]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.files[index]) as image:
                image = image.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ImageFileError(f"image {self.name(index)!r} cannot be read ({reason})") from None
        x = self.transform(image)  # (C, H, W)
        if tuple(x.shape) != self.shape:
            raise ImageFileError(
                f"image {self.name(index)!r} is {tuple(x.shape)} after the data set's "
                f"transforms, the data set's inputs are {self.shape}"
            )
        return x, -1
