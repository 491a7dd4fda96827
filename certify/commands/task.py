"""The sampling work of ``certify`` and ``predict``, run through ``Trainer.predict``.

Lightning launches the processes (``--trainer.devices N``, ``--trainer.num_nodes M``) and
shards the pending examples across them without repeats; each process appends its rows to its
own part file as examples finish, and rank 0 merges them, sorted by dataset index, into the
command's files. ``SamplingTask`` holds what both commands share: the pending examples, the
part file, SIGTERM between batches, one ``SmoothedClassifier`` for the run and the one-line
refusal of a batch size beyond memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from certify.commands.settings import CertifySettingsError
from certify.commands.startup import Weights
from certify.sampling.options import check_autocast, check_compile
from certify.sampling.smoothing import DEFAULT_BATCH_SIZE, SmoothedClassifier


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select_examples(size: int, skip: int, max_examples: int | None) -> list[int]:
    """Every ``skip``-th index from 0 (the papers' every-20th image), at most ``max_examples``."""
    indices = list(range(0, size, skip))
    return indices if max_examples is None else indices[:max_examples]


def load_weights(model: pl.LightningModule, ckpt_path: str | None, trust: bool):
    """Load ``ckpt_path`` into ``model.net`` (our Lightning checkpoint or one of Cohen et al.'s
    models); ``(Weights, the checkpoint's sha256 or None)``. A network left with its random
    initial weights (no checkpoint, no ``--model.weights``) is refused."""
    from certify.commands.checkpoints import load_network_weights

    hparams = getattr(model, "hparams", {})
    if ckpt_path is None and hparams.get("weights") is None:
        raise CertifySettingsError(
            "no --ckpt_path and no --model.weights: the network has its random initial "
            "weights; pass a checkpoint (--ckpt_path) or pretrained weights (--model.weights)"
        )
    kind = sha256 = None
    if ckpt_path is not None:
        kind = load_network_weights(model.net, ckpt_path, hparams.get("arch"), trust)
        sha256 = file_sha256(ckpt_path)
    return Weights.of(model, ckpt_path, kind, sha256), sha256


def split_dataset(datamodule: pl.LightningDataModule, split: str) -> Dataset:
    """The ``test`` or ``val`` split of ``datamodule``, set up; an empty one is refused."""
    datamodule.setup("test" if split == "test" else "validate")
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise CertifySettingsError(f"the datamodule has no {split} examples")
    return dataset


def require_compiler(compile: bool, device: torch.device) -> None:
    """With ``compile`` on, a missing compiler is one line now, before anything is written."""
    if compile:
        try:
            check_compile(device)
        except ValueError as err:
            raise CertifySettingsError(str(err)) from None


class _Examples(Dataset):
    """The pending examples: ``(image, label, dataset index)``."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]][:2]
        return torch.as_tensor(image), int(label), self.indices[i]


class SamplingTask(pl.LightningModule):
    """Sample ``selected`` examples of ``dataset`` with the smoothed ``net``; subclasses write
    the rows (``predict_step``) and merge them (``finish``).

    Args:
        net: base classifier on [0, 1] pixels.
        num_classes: number of labels.
        dataset: the split (items ``(image, label, ...)``).
        selected: dataset indices to process.
        output: the output directory (already prepared).
        options: ``n``, ``sigma``, ``seed``, ``batch_size``, ``channels_last``, ``autocast``
            (``"bf16"``, ``"fp16"`` or None), ``compile`` and the command's own settings.
    """

    command = "certify"  #: the command's name in messages

    def __init__(self, net, num_classes, dataset, selected, output, options) -> None:
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self.dataset, self.selected, self.output, self.options = dataset, selected, output, options
        self.pending: list[int] = []
        self._fd: int | None = None
        self._smoothed: SmoothedClassifier | None = None

    def setup(self, stage: str) -> None:
        done = self.output.read_parts()
        self.pending = [i for i in self.selected if i not in done]

    def examples_per_step(self) -> int:
        sampler_batch = self.options["batch_size"] or DEFAULT_BATCH_SIZE
        return max(1, min(64, sampler_batch // self.options["n"]))

    def predict_dataloader(self) -> DataLoader:
        examples = _Examples(self.dataset, self.pending)
        return DataLoader(examples, batch_size=self.examples_per_step(), shuffle=False)

    def on_predict_start(self) -> None:
        self.trainer.strategy.barrier(f"{self.command}-open")  # everyone has read the parts
        self._fd = self.output.open_part(self.global_rank)

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning's predict loop notes a SIGTERM (e.g. from `timeout` or a scheduler) but
        # carries on; stop between batches, with the finished examples kept for a rerun.
        if self.trainer.received_sigterm:
            if self.global_rank == 0:
                print(
                    f"{self.command}: stopped by SIGTERM; the finished examples are kept in "
                    f"{self.output.directory}, rerun the same command to continue",
                    file=sys.stderr,
                    flush=True,
                )
            raise SIGTERMException(128 + signal.SIGTERM)

    @property
    def smoothed(self) -> SmoothedClassifier:
        """The run's smoothed classifier: compiled once, its batch size tuned once."""
        if self._smoothed is None:
            opts = self.options
            self._smoothed = SmoothedClassifier(
                self.net, self.num_classes, opts["sigma"],
                autocast_dtype=check_autocast(opts["autocast"]),
                channels_last=opts["channels_last"], compile=opts["compile"],
            )  # fmt: skip
        return self._smoothed

    def sample(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` (a sampling call); a batch beyond memory is one line."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            text = str(err)
            if not isinstance(err, torch.OutOfMemoryError) and "allocate memory" not in text:
                raise
            size = self.options["batch_size"] or "(tuned)"
            tried = re.search(r"tried to allocate [\d.]+ ?\w+", text, re.IGNORECASE)
            raise CertifySettingsError(
                f"batch_size {size} does not fit in memory ("
                f"{tried.group(0) if tried else text.splitlines()[0][:120]}); choose a smaller "
                "--batch_size, or leave it out to have one tuned"
            ) from None

    def on_predict_end(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.trainer.strategy.barrier(f"{self.command}-merge")
        if self.global_rank == 0:
            self.finish()

    def finish(self) -> None:
        raise NotImplementedError
