"""``topk-smoothing predict`` (``CertifyingTrainer.predict``): top-k sets with a radius per label,
on a split or a folder of image files, from n fresh samples or, with ``sequential``, from
samples drawn in rounds; part lines hold the n0 selection counts, then the fresh ones
(``docs/commands.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)

from certify.commands.images import FolderImages
from certify.commands.outputs import RunOutput, data_identity
from certify.commands.task import (
    SamplingTask,
    check_options,
    default_output_dir,
    record_sequential,
    sequential_line,
    sequential_targets,
    split_dataset,
)
from certify.math.validation import UsageError, check_top_k
from certify.training.metric import plural

ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})  # a file name


def predict(
    self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
    ckpt_path: str | None = None, trust_checkpoint: bool = False, images: str | None = None,
    split: Literal["test", "val"] = "test", n0: PositiveInt = 100, n: PositiveInt = 100_000,
    alpha: OpenUnitInterval = 0.001, k: PositiveInt = 1, skip: PositiveInt = 1,
    max_examples: PositiveInt | None = None, batch_size: PositiveInt | None = None,
    seed: NonNegativeInt = 0, sigma: PositiveFloat | None = None, output_dir: str | None = None,
    channels_last: bool = False, autocast: Literal["bf16", "fp16"] | None = None,
    compile: bool = False, sequential: bool = False, radii: list[NonNegativeFloat] | None = None,
) -> bool:  # fmt: skip
    """Top-k sets of the smoothed classifier, with a certified radius for each label.

    As ``SmoothedClassifier.predict_certified``: n0 samples choose k labels, n fresh samples
    give each its radius (nan: not certified); with probability at least 1 - alpha every
    radius of an input holds. An input with no label certified is an abstention (-1s). With
    ``sequential`` (``SmoothedClassifier.predict_sequential``) the fresh samples come in rounds
    until each label's targets are decided, and a label's radius is the largest target certified.

    Args:
        model: the trained classifier (its ``net``, ``num_classes`` and ``sigma``).
        datamodule: provides the split, and the transforms for ``images``.
        ckpt_path: our Lightning checkpoint or one of Cohen et al.'s released models.
        trust_checkpoint: load a checkpoint that holds pickled Python objects.
        images: a folder of image files to predict instead of a split (recursive, sorted).
        split: ``test`` or ``val``.
        n0: samples that choose the k labels.
        n: fresh samples that bound them (the most, with ``sequential``).
        alpha: the probability that some radius of an input is wrong.
        k: the size of the label set.
        skip: every ``skip``-th example.
        max_examples: at most this many examples (after ``skip``).
        batch_size: noisy samples per forward pass (default: the sampler's choice).
        seed: base seed of the noise; each example's streams are keyed by its index.
        sigma: noise level (default: the model's training sigma).
        output_dir: where the files go (default: ``runs/predict/<checkpoint>_<inputs>_...``).
        channels_last: channels-last noisy batches, as for ``certify``.
        autocast: the forward pass in ``bf16`` or ``fp16``, as for ``certify``.
        compile: ``torch.compile`` the base classifier, as for ``certify``.
        sequential: fresh samples in growing rounds until decided (docs/sequential.md).
        radii: the targets of ``sequential``, e.g. ``[0.25,0.5]`` (default: 0 .. 2).

    Returns:
        True when every selected example is done and ``predict.tsv`` is written.
    """
    check_options(model, datamodule, alpha, seed, sigma, output_dir)
    fixed = "a fixed-n predict states each label's own certified radius"
    targets = sequential_targets(sequential, radii, fixed)
    if images is not None and not Path(images).expanduser().is_dir():
        raise UsageError(f"images {images!r} is not a directory")
    (k,) = check_top_k(k, int(model.num_classes))
    who, meta = self._load(model, ckpt_path, trust_checkpoint, sigma, compile)
    dataset, names, what = split_dataset(datamodule, split), None, split
    if images is not None:
        dataset = FolderImages(images, dataset)  # all read once, through its transforms
        meta["images"] = dataset.identity  # other contents: another run, another directory
        names = [dataset.name(i) for i in range(len(dataset))]
        what = f"{Path(images).name or 'images'}-{meta['images']['sha256'][:8]}"
    else:
        meta.update(split=split, data=data_identity(datamodule))
    meta.update(n0=n0, n=n, alpha=alpha, k=k, autocast=autocast, compile=compile)
    if sequential:
        record_sequential(meta, targets)
    header = ["idx", "label" if names is None else "file", *(f"pred{i + 1}" for i in range(k))]
    header += [*(f"radius{i + 1}" for i in range(k)), *["samples"][: int(sequential)], "seconds"]
    seq = {"seq": radii or "default"} if sequential else {}  # its own default directory
    where = default_output_dir("predict", who["name"], what, n0=n0, n=n, sigma=meta["sigma"],
                               k=k, **seq)  # fmt: skip
    output = RunOutput(output_dir or where, "predict.json", meta, header)

    def step(smoothed, x, labels, ids):  # x (b, C, H, W), labels (b,)
        samples = None
        if sequential:
            chosen, radii, drawn, selection, counts = smoothed.predict_sequential(
                x, k, n0, targets, n, alpha, batch_size, seed, ids, return_counts=True
            )  # (b, k), (b, k), (b,), (b, c), (b, c)
            samples = [[s] for s in drawn.tolist()]
        else:
            chosen, radii, selection, counts = smoothed.predict_certified(
                x, k, n0, n, alpha, batch_size, seed, ids, return_counts=True
            )  # (b, k), (b, k), (b, c), (b, c)
        return chosen, radii, torch.cat([selection, counts], dim=1), samples  # counts (b, 2c)

    def finish(rows: list[list[str]]) -> None:  # the part lines' fields, by index
        table, counts = [header], [["idx", "selection_counts", "counts"]]
        for f in rows:
            values = f[-1].split(" ")  # the n0 selection counts, then the n fresh ones
            half = len(values) // 2
            counts.append([f[0], " ".join(values[:half]), " ".join(values[half:])])
            name = names[int(f[0])] if names is not None else f[1]  # a file: its name
            table.append([f[0], name.translate(ESCAPES), *f[2:-1]])
        output.write("predict.tsv", ["\t".join(row) + "\n" for row in table])
        if not sequential:  # stopped counts would give `certified_prediction` no guarantee
            output.write("counts.tsv", ["\t".join(row) + "\n" for row in counts])
        files = "predict.tsv" if sequential else "predict.tsv and counts.tsv"
        line = summary(rows, k, names is None, sequential)
        print(f"{line}; wrote {files} to {output.directory}")

    if sequential and self.is_global_zero:
        print(sequential_line("predict", n, targets))
    per_step = 64 if sequential else max(1, min(64, (batch_size or 2048) // n))
    task = SamplingTask("predict", output, dataset, step, finish, per_step, batch_size)
    inputs = f"images in {images}" if images is not None else f"{split} split"
    settings = dict(n0=n0, n=n, alpha=alpha, k=k, inputs=inputs)
    sizes = f"n0 = {n0}, {'at most ' * sequential}n = {n}"
    return self._sample(model, who, skip, max_examples, sizes, task, settings,
                        seed, channels_last, autocast, compile, "predict.tsv")  # fmt: skip


def summary(rows: list[list[str]], k: int, split: bool, sequential: bool = False) -> str:
    """The closing line: answers, abstentions and why, labels certified, where the truth is,
    the fresh samples drawn (``sequential``) and the time."""
    top = np.array([f[2 : 2 + k] for f in rows], dtype=np.int64)  # (N, k)
    radii = np.array([f[2 + k : 2 + 2 * k] for f in rows], dtype=np.float64)  # (N, k)
    certified = ~np.isnan(radii)  # (N, k)
    total, answered, first = len(rows), int(certified.any(axis=1).sum()), certified[:, 0]
    line = f"predict: {plural(total, 'example')}, {answered} answered"
    if answered < total:
        line += f", {total - answered} abstained: no label certified"
    line += f"; {int(certified.sum())} of {certified.size} labels certified, pred1 for "
    line += f"{int(first.sum())}"
    if first.any():
        line += f" (median radius {np.median(radii[first, 0]):.4g})"
    if split:  # how often the true label is in the answer, and certified there
        hit = top == np.array([f[1] for f in rows], dtype=np.int64)[:, None]  # (N, k)
        line += f"; true label in the set for {int(hit.any(axis=1).sum())}, certified for "
        line += f"{int((hit & certified).any(axis=1).sum())}"
    if sequential:  # the samples column, before seconds
        samples = np.array([f[2 + 2 * k] for f in rows], dtype=np.int64)  # (N,)
        line += f"; {samples.mean():.0f} fresh samples each on average (median "
        line += f"{np.median(samples):.0f}, most {samples.max()})"
    return line + f"; {np.mean([float(f[-2]) for f in rows]):.3f} s each on average"
