"""``topk-smoothing certify``: certify a data split with a trained base classifier.

The work runs through ``Trainer.predict`` so that Lightning launches the processes
(``--trainer.devices N``, ``--trainer.num_nodes M``) and shards the pending examples across
them without repeats; each process appends its rows to its own part file as examples finish,
and rank 0 merges them, sorted by dataset index, into the final files and the report.
"""

from __future__ import annotations

import hashlib
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from certify.commands.outputs import RESULTS, CertifyOutput, data_identity
from certify.commands.report import write_report
from certify.commands.sequential import sequential_metadata
from certify.commands.settings import CertifySettingsError, check_settings
from certify.math.radius import certified_radius
from certify.math.validation import check_sigma, check_top_k, default_top_k
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


class _Examples(Dataset):
    """The pending examples: ``(image, label, dataset index)``."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.dataset[self.indices[i]][:2]
        return torch.as_tensor(image), int(label), self.indices[i]


class CertifyTask(pl.LightningModule):
    """Certify ``selected`` examples of ``dataset`` with the smoothed ``net``.

    Args:
        net: base classifier on [0, 1] pixels.
        num_classes: number of labels.
        dataset: the split to certify (items ``(image, label, ...)``).
        selected: dataset indices to certify.
        output: the output directory (already prepared).
        options: ``n``, ``alpha``, ``top_k``, ``bounds``, ``sigma``, ``seed``, ``batch_size``,
            ``channels_last``, ``autocast`` (``"bf16"``, ``"fp16"`` or None), ``compile``,
            ``radii`` (the targets of a sequential run, with ``n`` its n_max; else None).
    """

    def __init__(self, net, num_classes, dataset, selected, output: CertifyOutput, options):
        super().__init__()
        self.net, self.num_classes = net, num_classes
        self.dataset, self.selected, self.output, self.options = dataset, selected, output, options
        self.pending: list[int] = []
        self._fd: int | None = None
        self._smoothed: SmoothedClassifier | None = None

    def setup(self, stage: str) -> None:
        done = self.output.read_parts()
        self.pending = [i for i in self.selected if i not in done]

    def predict_dataloader(self) -> DataLoader:
        sampler_batch = self.options["batch_size"] or DEFAULT_BATCH_SIZE
        per_step = max(1, min(64, sampler_batch // self.options["n"]))
        if self.options.get("radii") is not None:  # sequential: small rounds, many examples
            per_step = 64
        return DataLoader(_Examples(self.dataset, self.pending), batch_size=per_step, shuffle=False)

    def on_predict_start(self) -> None:
        self.trainer.strategy.barrier("certify-open")  # everyone has read the parts
        self._fd = self.output.open_part(self.global_rank)

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning's predict loop notes a SIGTERM (e.g. from `timeout` or a scheduler) but
        # carries on; stop between batches, with the finished examples kept for a rerun.
        if self.trainer.received_sigterm:
            if self.global_rank == 0:
                print(
                    f"certify: stopped by SIGTERM; the finished examples are kept in "
                    f"{self.output.directory}, rerun the same command to continue",
                    file=sys.stderr,
                    flush=True,
                )
            raise SIGTERMException(128 + signal.SIGTERM)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, labels, indices = batch  # (b, C, H, W), (b,), (b,)
        opts = self.options
        start = time.perf_counter()
        if self._smoothed is None:  # one for the run: compiled once, tuned once
            self._smoothed = SmoothedClassifier(
                self.net,
                self.num_classes,
                opts["sigma"],
                autocast_dtype=check_autocast(opts["autocast"]),
                channels_last=opts["channels_last"],
                compile=opts["compile"],
            )
        samples = None
        try:
            if opts.get("radii") is not None:
                cert = self._smoothed.certify_sequential(
                    x, labels.cpu(), opts["top_k"], opts["radii"], opts["n"], opts["alpha"],
                    opts["batch_size"], opts["seed"], example_ids=indices.tolist(),
                )  # fmt: skip
                counts, samples = cert.counts, cert.samples.tolist()  # (b, c), [b]
            else:
                counts = self._smoothed.sample_counts(
                    x, opts["n"], opts["batch_size"], opts["seed"], example_ids=indices.tolist()
                ).cpu()  # (b, c)
        except RuntimeError as err:  # torch.OutOfMemoryError, or the CPU allocator's refusal
            text = str(err)
            if not isinstance(err, torch.OutOfMemoryError) and "allocate memory" not in text:
                raise
            size = opts["batch_size"] or "(tuned)"
            tried = re.search(r"tried to allocate [\d.]+ ?\w+", text, re.IGNORECASE)
            raise CertifySettingsError(
                f"batch_size {size} does not fit in memory ("
                f"{tried.group(0) if tried else text.splitlines()[0][:120]}); choose a smaller "
                "--batch_size, or leave it out to have one tuned"
            ) from None
        if samples is not None:
            radii = cert.radius  # (b, K) the largest target certified
        else:
            radii = certified_radius(
                counts, labels.cpu(), opts["top_k"], opts["sigma"], opts["alpha"], opts["bounds"]
            )  # (b, K)
        order = counts.argsort(dim=1, descending=True, stable=True)[:, : max(opts["top_k"])]
        seconds = (time.perf_counter() - start) / len(indices)
        rows = [
            self.output.row(int(i), int(y), top.tolist(), r.tolist(), seconds, c.tolist(), m)
            for i, y, top, r, c, m in zip(
                indices, labels, order, radii, counts, samples or [None] * len(indices), strict=True
            )
        ]
        self.output.append(self._fd, rows)
        return radii

    def on_predict_end(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.trainer.strategy.barrier("certify-merge")
        if self.global_rank == 0:
            finish(self.output, self.selected, self.trainer)


def finish(output: CertifyOutput, selected: list[int], trainer: pl.Trainer | None) -> bool:
    """Merge the parts, write the report and log it to W&B; False if examples are missing.

    Prints the report's table and the sampling time per example (the ``seconds`` column).
    """
    if not output.merge(selected):
        return False
    result = write_report(output.directory / RESULTS)
    if trainer is not None:
        _log_to_wandb(trainer, result)
    seconds = np.loadtxt(output.directory / RESULTS, skiprows=1, usecols=-1, ndmin=1)
    print((result["output_dir"] / "report.md").read_text(), end="")
    print(
        f"certify: {len(selected)} examples, {seconds.mean():.3f} s each on average "
        f"({seconds.sum():.1f} s in all); wrote {RESULTS}, "
        f"{'' if output.sequential else 'counts.txt, '}report.md, report.csv "
        f"and certified_accuracy.png to {output.directory}"
    )
    return True


def _log_to_wandb(trainer: pl.Trainer, result: dict) -> None:
    from pytorch_lightning.loggers import WandbLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    columns = ["k", *(f"r={r:g}" for r in result["radii"]), "acr"]
    rows = [
        [k, *np.asarray(result["accuracy"][i]).tolist(), float(result["acr"][i])]
        for i, k in enumerate(result["top_k"])
    ]
    image = wandb.Image(str(result["output_dir"] / "certified_accuracy.png"))
    for logger in loggers:
        logger.experiment.log(
            {"certify/table": wandb.Table(columns=columns, data=rows), "certify/curve": image}
        )


class CertifyingTrainer(pl.Trainer):
    """A Lightning ``Trainer`` with one more entry point, ``certify``."""

    def certify(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        ckpt_path: str | None = None,
        n: int = 100_000,
        alpha: float = 0.001,
        k: list[int] | None = None,
        bounds: str = "simuem",
        split: str = "test",
        skip: int = 1,
        max_examples: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        sigma: float | None = None,
        output_dir: str = "runs/certify",
        channels_last: bool = False,
        autocast: str | None = None,
        compile: bool = False,
        sequential: bool = False,
        radii: list[float] | None = None,
    ) -> bool:
        """Certify a data split with the smoothed classifier (resumable, sharded over devices).

        Args:
            model: the trained classifier (its ``net``, ``num_classes`` and ``sigma``).
            datamodule: provides the split.
            ckpt_path: our Lightning checkpoint or one of Cohen et al.'s released models.
            n: noisy samples per example.
            alpha: failure probability of each certificate.
            k: the k values (default 1, 3, 5 below the number of classes).
            bounds: ``simuem`` or ``binocp``.
            split: ``test`` or ``val``.
            skip: certify every ``skip``-th example of the split (the papers use 20).
            max_examples: at most this many examples (after ``skip``).
            batch_size: noisy samples per forward pass (default: the sampler's choice).
            seed: base seed of the noise; each example's stream is keyed by its index.
            sigma: noise level (default: the model's training sigma).
            output_dir: where certify.tsv, counts.txt and the report go.
            channels_last: lay noisy batches out channels-last (faster for 3-channel conv
                nets on CPUs and with bf16 on GPUs; other noise layout, so other counts).
            autocast: run the base classifier's forward pass in ``bf16`` or ``fp16`` (the
                noise stays float32; other numerics, so other counts). The certificates hold
                for the classifier as it runs, in that precision.
            compile: ``torch.compile`` the base classifier (compiles on the first batches).
                With ``autocast bf16`` and ``channels_last`` on a GPU: 3.6x the original
                loop's throughput for a CIFAR ResNet-20 (``docs/performance.md``).
            sequential: sample each example in growing rounds and stop once every k is
                decided at every radius of ``radii`` (``docs/sequential.md``); ``n`` is then
                the most samples an example gets, and ``certify.tsv`` has their number.
            radii: the target radii of ``sequential`` (default: the report's radii 0 .. 2).

        Returns:
            True when every selected example is certified and the report is written.
        """
        from certify.commands.checkpoints import load_network_weights

        check_settings(
            n, alpha, bounds, split, skip, max_examples, batch_size, sigma, autocast,
            seed=seed, k=k, output_dir=output_dir, sequential=sequential, radii=radii,
        )  # fmt: skip
        num_classes = int(model.num_classes)
        try:
            sigma = check_sigma(float(model.sigma) if sigma is None else sigma)
            top_k = check_top_k(k if k is not None else default_top_k(num_classes), num_classes)
        except ValueError as err:
            raise CertifySettingsError(str(err)) from None
        arch = getattr(model, "hparams", {}).get("arch")
        if ckpt_path is None and getattr(model, "hparams", {}).get("weights") is None:
            raise CertifySettingsError(
                "no --ckpt_path and no --model.weights: the network has its random initial "
                "weights; pass a checkpoint (--ckpt_path) or pretrained weights (--model.weights)"
            )
        if ckpt_path is not None:
            load_network_weights(model.net, ckpt_path, arch)
        datamodule.setup("test" if split == "test" else "validate")
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is None or len(dataset) == 0:
            raise CertifySettingsError(f"the datamodule has no {split} examples")
        selected = select_examples(len(dataset), skip, max_examples)
        if compile:  # a missing compiler is reported now, before the output directory exists
            try:
                check_compile(self.strategy.root_device)
            except ValueError as err:
                raise CertifySettingsError(str(err)) from None
        metadata = {
            "n": n, "alpha": alpha, "sigma": sigma, "bounds": bounds, "top_k": list(top_k),
            "split": split, "skip": skip, "max_examples": max_examples, "seed": seed,
            "num_classes": num_classes, "examples": len(selected), "arch": arch,
            "checkpoint_sha256": None if ckpt_path is None else file_sha256(ckpt_path),
            "channels_last": bool(channels_last), "data": data_identity(datamodule),
            "noise_device": self.strategy.root_device.type,
            "noise_purpose": "certify",
        }  # fmt: skip
        if autocast is not None or compile:  # recorded when on, as since they were added
            metadata.update(autocast=autocast, compile=bool(compile))
        targets = None
        if sequential:  # n is n_max; the targets and the schedule's settings are recorded
            metadata, targets = sequential_metadata(metadata, radii)
        output = CertifyOutput(output_dir, metadata, top_k)
        output.prepare()
        finished = output.read_parts()
        done = sum(i in finished for i in selected)
        if self.is_global_zero:
            total, where = len(selected), output.directory
            if done == total:
                print(f"certify: all {total} examples are already in {where}; merging")
            elif done:
                print(f"certify: {done} of {total} examples already in {where}, resuming")
            else:
                print(f"certify: {total} examples, n = {n}, into {where}")
            if sequential:
                print(f"certify: sequential, at most n = {n} samples per example, radii {targets}")
        if done == len(selected):
            return finish(output, selected, self)
        options = dict(n=n, alpha=alpha, top_k=top_k, bounds=bounds, sigma=sigma, seed=seed,
                       batch_size=batch_size, channels_last=bool(channels_last),
                       autocast=autocast, compile=bool(compile), radii=targets)  # fmt: skip
        task = CertifyTask(model.net, num_classes, dataset, selected, output, options)
        self.predict(task, return_predictions=False)
        return (output.directory / RESULTS).is_file()
