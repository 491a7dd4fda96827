"""A folder of image files as inputs of ``predict``, through the data set's own transforms."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from certify.math.validation import UsageError


class FolderImages(Dataset):
    """The image files under ``folder`` (sorted by path; the id is the position) as ``(image,
    -1)`` through the transform of ``dataset`` (through ``Subset`` wrappers; ``ToTensor`` if it
    has none) to the shape of its inputs; each is read once here, so a bad one is refused."""

    def __init__(self, folder: str | Path, dataset: Dataset) -> None:
        self.root = Path(folder).expanduser()
        self.shape = tuple(torch.as_tensor(dataset[0][0]).shape)  # (C, H, W) of the inputs
        while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        transform = getattr(dataset, "transform", None)
        self.transform = transforms.ToTensor() if transform is None else transform
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise UsageError(
                f"images {str(folder)!r} holds no image files ({', '.join(IMG_EXTENSIONS)})"
            )
        self.mode = {1: "L", 3: "RGB"}.get(self.shape[0])
        if self.mode is None:
            raise UsageError(
                f"images: the data set's inputs have {self.shape[0]} channels; image files "
                "give 1 (grey) or 3 (RGB)"
            )
        digest = hashlib.sha256()  # of the names and contents: a file changed is another run
        for index, path in enumerate(self.files):
            self[index]  # a file that cannot be an input is refused here
            content = path.read_bytes()
            digest.update(f"{self.name(index)}\0{len(content)}\n".encode())
            digest.update(hashlib.sha256(content).digest())
        self.identity = {"folder": str(self.root.resolve()), "files": len(self.files),
                         "sha256": digest.hexdigest()}  # fmt: skip

    def name(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.files[index]) as image:
                image = image.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise UsageError(f"image {self.name(index)!r} cannot be read ({reason})") from None
        x = self.transform(image)  # (C, H, W)
        if tuple(x.shape) != self.shape:
            raise UsageError(
                f"image {self.name(index)!r} is {tuple(x.shape)} after the data set's "
                f"transforms, the data set's inputs are {self.shape}"
            )
        return x, -1
