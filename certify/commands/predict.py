"""``topk-smoothing predict``: the smoothed classifier's top-k sets with a radius per label.

For every example of a split (or every image file of a folder) n0 samples of the selection
streams choose k labels and n fresh samples of the certify streams bound them
(``certify.math.prediction.certified_prediction``): the answer is the k labels of the smoothed
top-k classifier, each with the l2 radius within which it stays in the top-k, or an
abstention, wrong with probability at most alpha. The run is resumable and sharded over
processes like ``certify`` (the same part files and ``Trainer.predict``), into ``predict.tsv``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from certify.commands.images import FolderImages, evaluation_transform
from certify.commands.outputs import data_identity
from certify.commands.predict_output import COUNTS, PREDICTIONS, PredictOutput
from certify.commands.settings import CertifySettingsError, check_settings
from certify.commands.startup import default_output_dir, device_text, startup_line
from certify.commands.task import (
    SamplingTask,
    load_weights,
    require_compiler,
    select_examples,
    split_dataset,
)
from certify.math.prediction import certified_prediction, select_top_k
from certify.math.validation import check_int, check_sigma, check_top_k


def check_predict_settings(n0, n, alpha, k, split, images, **more) -> None:
    """Reject impossible ``predict`` settings before anything is built (``more``: ``skip``,
    ``max_examples``, ``batch_size``, ``sigma``, ``autocast``, ``seed``, ``output_dir``)."""
    check_settings(
        n, alpha, "simuem", split, more.get("skip", 1), more.get("max_examples"),
        more.get("batch_size"), more.get("sigma"), more.get("autocast"),
        seed=more.get("seed"), output_dir=more.get("output_dir"),
    )  # fmt: skip
    try:
        check_int(n0, "n0")
        if isinstance(k, (list, tuple)):
            raise ValueError(f"k must be one integer (the size of the label set), got {k!r}")
        check_top_k(k, None)
    except ValueError as err:
        raise CertifySettingsError(str(err)) from None
    if images is not None and not Path(images).expanduser().is_dir():
        raise CertifySettingsError(f"images {images!r} is not a directory")


class PredictTask(SamplingTask):
    """Predict ``selected`` examples of ``dataset`` with the smoothed ``net``
    (``SamplingTask``); ``options`` also hold ``n0``, ``k`` and ``alpha``."""

    command = "predict"

    def _counts(self, x: torch.Tensor, n: int, ids: list[int], purpose: str) -> torch.Tensor:
        opts = self.options
        return self.sample(
            self.smoothed.sample_counts, x, n, opts["batch_size"], opts["seed"], ids, purpose
        ).cpu()  # (b, c)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, labels, indices = batch  # (b, C, H, W), (b,), (b,)
        opts, ids = self.options, indices.tolist()
        start = time.perf_counter()
        selection = self._counts(x, opts["n0"], ids, "selection")  # (b, c)
        _, separated = select_top_k(selection, opts["k"])  # (b,)
        counts = torch.zeros_like(selection)  # (b, c): no fresh samples where it abstains
        if separated.any():
            chosen_ids = [i for i, s in zip(ids, separated.tolist(), strict=True) if s]
            rows = x[separated.to(x.device)]  # (s, C, H, W)
            counts[separated] = self._counts(rows, opts["n"], chosen_ids, "certify")
        chosen, radii = certified_prediction(
            selection, counts, opts["k"], opts["sigma"], opts["alpha"]
        )  # (b, k), (b, k)
        seconds = (time.perf_counter() - start) / len(ids)
        both = torch.cat([selection, counts], dim=1)  # (b, 2c): the part line's counts
        lines = [
            self.output.row(i, int(y), top.tolist(), r.tolist(), seconds, c.tolist())
            for i, y, top, r, c in zip(ids, labels, chosen, radii, both, strict=True)
        ]
        self.output.append(self._fd, lines)
        return radii

    def finish(self) -> None:
        finish_predict(self.output, self.selected)


def finish_predict(output: PredictOutput, selected: list[int]) -> bool:
    """Merge the parts into ``predict.tsv`` and ``counts.tsv`` and print a summary."""
    if not output.merge(selected):
        return False
    table = np.genfromtxt(
        output.directory / PREDICTIONS, delimiter="\t", skip_header=1, dtype=np.float64,
        usecols=range(2, 2 + 2 * output.k + 1), ndmin=2, comments=None,
    )  # fmt: skip
    labels, radii = table[:, : output.k], table[:, output.k : 2 * output.k]
    answered = labels[:, 0] >= 0
    parts = [f"predict: {len(selected)} examples, {int(answered.sum())} answered"]
    if output.names is None:  # a split: how often the true label is in the answer
        truth = np.loadtxt(output.directory / PREDICTIONS, skiprows=1, usecols=1, ndmin=1)
        hit = (labels == truth[:, None]).any(axis=1) & answered
        parts.append(f"{int(hit.sum())} of them with the true label")
    if answered.any():
        parts.append(f"median radius of pred1 {np.median(radii[answered, 0]):.4g}")
    seconds = table[:, -1]
    parts.append(f"{seconds.mean():.3f} s each on average")
    print(", ".join(parts) + f"; wrote {PREDICTIONS} and {COUNTS} to {output.directory}")
    return True


def smoothed_predict(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None = None,
    images: str | None = None,
    split: str = "test",
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    k: int = 1,
    skip: int = 1,
    max_examples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    sigma: float | None = None,
    output_dir: str | None = None,
    channels_last: bool = False,
    autocast: str | None = None,
    compile: bool = False,
    trust_checkpoint: bool = False,
) -> bool:
    """The smoothed classifier's top-k set with a certified radius per label, or abstain.

    Args:
        trainer: runs the work (``Trainer.predict``; one process or DDP).
        model: the trained classifier (its ``net``, ``num_classes`` and ``sigma``).
        datamodule: provides the split, and the transforms for ``images``.
        ckpt_path: our Lightning checkpoint or one of Cohen et al.'s released models.
        images: a folder of image files to predict instead of a split (read recursively,
            sorted by path, through the data set's evaluation transforms).
        split: ``test`` or ``val``.
        n0: samples that choose the k labels (the selection streams).
        n: fresh samples that bound them (the certify streams).
        alpha: the probability that an answer or one of its radii is wrong.
        k: the size of the label set.
        skip: every ``skip``-th example; max_examples: at most this many (after ``skip``).
        batch_size: noisy samples per forward pass (default: the sampler's choice).
        seed: base seed of the noise; each example's streams are keyed by its index.
        sigma: noise level (default: the model's training sigma).
        output_dir: where ``predict.tsv`` and ``counts.tsv`` go (default: ``runs/predict/
            <checkpoint>_<split or folder>_n0-<n0>_n<n>_sigma<sigma>_k<k>``).
        channels_last, autocast, compile: the sampler's options, as for ``certify``.
        trust_checkpoint: load a checkpoint that holds pickled Python objects.

    Returns:
        True when every selected example is done and ``predict.tsv`` is written.
    """
    check_predict_settings(
        n0, n, alpha, k, split, images, skip=skip, max_examples=max_examples,
        batch_size=batch_size, sigma=sigma, autocast=autocast, seed=seed, output_dir=output_dir,
    )  # fmt: skip
    num_classes = int(model.num_classes)
    try:
        sigma = check_sigma(float(model.sigma) if sigma is None else sigma)
        (k,) = check_top_k(k, num_classes)
    except ValueError as err:
        raise CertifySettingsError(str(err)) from None
    arch = getattr(model, "hparams", {}).get("arch")
    weights, sha256 = load_weights(model, ckpt_path, trust_checkpoint)
    reference = split_dataset(datamodule, split)
    if images is not None:
        shape = tuple(torch.as_tensor(reference[0][0]).shape)
        dataset = FolderImages(images, evaluation_transform(reference), shape)
        dataset.check()
        identity = dataset.identity()  # other contents, another default output directory
        source = {"images": identity}
        what = f"{Path(images).name or 'images'}-{identity['sha256'][:8]}"
    else:
        dataset, source, what = (
            reference,
            {"split": split, "data": data_identity(datamodule)},
            split,
        )
    selected = select_examples(len(dataset), skip, max_examples)
    require_compiler(compile, trainer.strategy.root_device)
    metadata = {
        "n0": n0, "n": n, "alpha": alpha, "k": k, "sigma": sigma, "skip": skip,
        "max_examples": max_examples, "seed": seed, "num_classes": num_classes,
        "examples": len(selected), "arch": arch, "checkpoint_sha256": sha256,
        "channels_last": bool(channels_last), "autocast": autocast, "compile": bool(compile),
        "noise_device": trainer.strategy.root_device.type, **source,
    }  # fmt: skip
    if output_dir is None:
        output_dir = default_output_dir("predict", weights.name, what, n0=n0, n=n, sigma=sigma, k=k)
    names = [dataset.name(i) for i in range(len(dataset))] if images is not None else None
    output = PredictOutput(output_dir, metadata, k, names)
    output.prepare()
    done = sum(i in output.read_parts() for i in selected)
    if trainer.is_global_zero:
        print(startup_line(
            "predict", weights=weights, arch=arch, sigma=sigma, net=model.net,
            device=device_text(trainer),
            settings=dict(n0=n0, n=n, alpha=alpha, k=k, examples=len(selected),
                          inputs=f"images in {images}" if images is not None else f"{split} split"),
            options=dict(batch_size=batch_size or "tuned", seed=seed,
                         channels_last=bool(channels_last), autocast=autocast,
                         compile=bool(compile)),
        ), flush=True)  # fmt: skip
        where = output.directory
        if done == len(selected):
            print(f"predict: all {done} examples are already in {where}; merging")
        elif done:
            print(f"predict: {done} of {len(selected)} examples already in {where}, resuming")
        else:
            print(f"predict: {len(selected)} examples, n0 = {n0}, n = {n}, into {where}")
    if done == len(selected):
        return finish_predict(output, selected) if trainer.is_global_zero else True
    options = dict(n0=n0, n=n, k=k, alpha=alpha, sigma=sigma, seed=seed, batch_size=batch_size,
                   channels_last=bool(channels_last), autocast=autocast,
                   compile=bool(compile))  # fmt: skip
    task = PredictTask(model.net, num_classes, dataset, selected, output, options)
    trainer.predict(task, return_predictions=False)
    return (output.directory / PREDICTIONS).is_file()
