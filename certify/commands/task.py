"""The sampling work of ``certify`` and ``predict`` through Lightning's predict loop (which
shards the pending examples across processes; rank 0 merges the part files), and the checks and
defaults both commands share."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from certify.commands.countfile import format_radius
from certify.commands.outputs import RunOutput, part_line
from certify.commands.report import DEFAULT_RADII
from certify.math import sequential as schedule
from certify.math.validation import UsageError, check_alpha, check_radii, check_seed, check_sigma
from certify.sampling.options import AUTOCAST_DTYPES
from certify.sampling.smoothing import SmoothedClassifier
from lightning_modules.cli import prepare_wandb


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")


def default_output_dir(command: str, weights: str, what: str, **settings) -> Path:
    """``runs/<command>/<weights>_<what>_<key><value>...`` (``n0-100``: key ends in a digit)."""
    parts = [safe(weights) or "weights", safe(what)]
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = "-".join(map(str, value))
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{key}-{value}" if key[-1].isdigit() else f"{key}{value}")
    return Path("runs", command, "_".join(parts))


def check_options(model, datamodule, alpha, seed, sigma, output_dir) -> None:
    """What the option types of ``certify`` and ``predict`` cannot say."""
    check_alpha(alpha)  # at least MIN_ALPHA
    check_seed(seed)  # below 2**64
    if sigma is not None:
        check_sigma(sigma)  # finite
    if output_dir is not None and not str(output_dir).strip():
        raise UsageError(f"output_dir must name a directory, got {output_dir!r}")
    if output_dir is not None and Path(output_dir).is_file():
        raise UsageError(f"output_dir {output_dir} is a file, not a directory")
    if datamodule is None:
        raise UsageError("no datamodule: pass --data (or a config with one)")
    if getattr(model, "net", None) is None:
        raise UsageError(f"the model {type(model).__name__} has no `net` to smooth")


def sequential_targets(sequential: bool, radii, fixed: str) -> tuple[float, ...] | None:
    """The targets of a sequential run (default: the report's radii); ``None`` for a fixed-n
    run, which refuses ``radii`` (``fixed`` says what it does instead)."""
    if radii is not None and not sequential:
        raise UsageError(f"--radii sets the targets of --sequential true; {fixed}")
    return check_radii(DEFAULT_RADII if radii is None else radii) if sequential else None


def record_sequential(meta: dict, targets: tuple[float, ...]) -> None:
    """In the settings file: ``n`` is ``n_max``; the targets and the schedule's settings."""
    spending = f"{schedule.DEFAULT_LAST_SHARE:g} of alpha at the last look, the rest evenly"
    meta.update(mode="sequential", n_max=meta.pop("n"), radii=list(targets),
                first=schedule.DEFAULT_FIRST, growth=schedule.DEFAULT_GROWTH,
                futility=schedule.DEFAULT_FUTILITY, budget=schedule.DEFAULT_BUDGET,
                spending=spending)  # fmt: skip


def sequential_line(command: str, n: int, targets: tuple[float, ...]) -> str:
    radii = " ".join(f"{r:g}" for r in targets)
    return f"{command}: sequential, at most n = {n} samples per example, target radii {radii}"


def split_dataset(datamodule: pl.LightningDataModule, split: str) -> Dataset:
    """The ``test`` or ``val`` split of ``datamodule``, set up; an empty one is refused."""
    datamodule.setup("test" if split == "test" else "validate")
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None or len(dataset) == 0:
        raise UsageError(f"the datamodule has no {split} examples")
    return dataset


class LoggersWhenSampling(pl.Callback):
    """A command's loggers, attached once sampling starts or the finished parts are merged
    (Lightning would start a W&B run at setup): a W&B run begins only when the command logs,
    named for the command and its output directory."""

    def __init__(self, command: str, loggers: list) -> None:
        self.command, self.loggers = command, loggers

    def on_predict_start(self, trainer: pl.Trainer, task: pl.LightningModule) -> None:
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):  # wandb.init's arguments, where not given
                init = logger._wandb_init
                init["name"] = init.get("name") or f"{self.command} {task.output.directory.name}"
                init["job_type"] = init.get("job_type") or self.command
        prepare_wandb(self.loggers)
        trainer.loggers = self.loggers


class SamplingTask(pl.LightningModule):
    """``step(smoothed, x, labels, ids)`` -> labels (b, K), radii (b, K'), counts (b, c), extra
    fields per example or None, on the ``selected`` examples of ``dataset`` not yet in
    ``output``; rank 0's ``finish`` writes the files from the merged rows. With ``progress``,
    the first process shows a bar of its examples, named for the command."""

    def __init__(self, command: str, output: RunOutput, dataset: Dataset, step: Callable,
                 finish: Callable, per_step: int, batch_size: int | None) -> None:  # fmt: skip
        super().__init__()
        self.command, self.output, self.dataset, self.step = command, output, dataset, step
        self.finish, self.per_step, self.batch_size = finish, per_step, batch_size
        self.selected: list[int] = []
        self.progress, self.bar, self.pending = False, None, 0

    def merge(self) -> None:
        rows = self.output.merged(self.selected)
        if rows is not None:
            self.finish(rows)

    def load(self, indices: list[int]):
        items = [self.dataset[i][:2] for i in indices]
        x = torch.stack([torch.as_tensor(image) for image, _ in items])  # (b, C, H, W)
        return x, torch.tensor([int(label) for _, label in items]), list(indices)

    def predict_dataloader(self) -> DataLoader:  # the examples no part file holds yet
        done = self.output.read_parts()
        pending = [i for i in self.selected if i not in done]
        self.pending = len(pending)
        return DataLoader(pending, batch_size=self.per_step, collate_fn=self.load)

    def on_predict_start(self) -> None:
        self.trainer.strategy.barrier(f"{self.command}-open")  # everyone read the parts
        self._fd = self.output.open_part(self.global_rank)
        meta = self.output.metadata  # `net` is on its device now
        self.smoothed = SmoothedClassifier(
            self.net, meta["num_classes"], meta["sigma"], AUTOCAST_DTYPES[meta.get("autocast")],
            channels_last=meta["channels_last"], compile=meta.get("compile", False),
        )  # fmt: skip
        if self.progress and self.global_rank == 0:  # its share: every world_size-th example
            from tqdm.auto import tqdm

            world = self.trainer.world_size
            name = self.command if world == 1 else f"{self.command}, process 0 of {world}"
            total = len(range(0, self.pending, world))
            self.bar = tqdm(total=total, desc=name, unit="example", dynamic_ncols=True)

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.trainer.received_sigterm:  # Lightning's predict loop would carry on
            if self.global_rank == 0:
                print(
                    f"{self.command}: stopped by SIGTERM; the finished examples are kept "
                    f"in {self.output.directory}, rerun the same command to continue",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            raise SIGTERMException(128 + signal.SIGTERM)

    def predict_step(self, batch, batch_idx: int) -> int:
        x, labels, indices = batch  # (b, C, H, W), (b,), [b]
        start = time.perf_counter()
        try:
            top, radii, counts, extra = self.step(self.smoothed, x, labels, indices)
        except RuntimeError as err:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            text = str(err)
            if not isinstance(err, torch.OutOfMemoryError) and "allocate memory" not in text:
                raise
            tried = re.search(r"tried to allocate [\d.]+ ?\w+", text, re.IGNORECASE)
            raise UsageError(
                f"batch_size {self.batch_size or '(automatic)'} does not fit in memory ("
                f"{tried.group(0) if tried else text.splitlines()[0][:120]}); choose a smaller "
                "--batch_size, or leave it out to have one chosen"
            ) from None
        seconds = (time.perf_counter() - start) / len(indices)
        rows = zip(indices, labels.tolist(), top.tolist(), radii.tolist(), counts.tolist(),
                   extra or [[]] * len(indices), strict=True)  # fmt: skip
        lines = [part_line([i, y, *t, *map(format_radius, r), *e], seconds, c)
                 for i, y, t, r, c, e in rows]  # fmt: skip
        self.output.append(self._fd, lines)
        if self.bar is not None:
            self.bar.update(len(lines))
        return len(lines)

    def on_predict_end(self) -> None:
        os.close(self._fd)
        self.trainer.strategy.barrier(f"{self.command}-merge")
        if self.global_rank == 0:
            self.merge()
