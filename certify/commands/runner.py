"""``topk-smoothing certify``: certify a data split with a trained base classifier.

The work runs through ``Trainer.predict`` (``certify.commands.task``): resumable, sharded over
processes, merged by rank 0 into ``certify.tsv``, ``counts.txt`` and the report.
"""

from __future__ import annotations

import time

import numpy as np
import pytorch_lightning as pl
import torch

from certify.commands.outputs import RESULTS, CertifyOutput, data_identity
from certify.commands.report import write_report
from certify.commands.sequential import sequential_metadata
from certify.commands.settings import CertifySettingsError, check_settings
from certify.commands.startup import default_output_dir, device_text, startup_line
from certify.commands.task import (
    SamplingTask,
    load_weights,
    require_compiler,
    select_examples,
    split_dataset,
)
from certify.math.radius import certified_radius
from certify.math.validation import check_sigma, check_top_k, default_top_k


class CertifyTask(SamplingTask):
    """Certify ``selected`` examples of ``dataset`` (``SamplingTask``); ``options`` also hold
    ``alpha``, ``top_k``, ``bounds`` and ``radii`` (the targets of a sequential run, with ``n``
    its n_max; else None)."""

    def examples_per_step(self) -> int:
        if self.options.get("radii") is not None:  # sequential: small rounds, many examples
            return 64
        return super().examples_per_step()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, labels, indices = batch  # (b, C, H, W), (b,), (b,)
        opts, ids = self.options, indices.tolist()
        start = time.perf_counter()
        samples = None
        if opts.get("radii") is not None:
            cert = self.sample(
                self.smoothed.certify_sequential, x, labels.cpu(), opts["top_k"], opts["radii"],
                opts["n"], opts["alpha"], opts["batch_size"], opts["seed"], example_ids=ids,
            )  # fmt: skip
            counts, samples = cert.counts, cert.samples.tolist()  # (b, c), [b]
            radii = cert.radius  # (b, K) the largest target certified
        else:
            counts = self.sample(
                self.smoothed.sample_counts,
                x,
                opts["n"],
                opts["batch_size"],
                opts["seed"],
                example_ids=ids,
            ).cpu()  # (b, c)
            radii = certified_radius(
                counts, labels.cpu(), opts["top_k"], opts["sigma"], opts["alpha"], opts["bounds"]
            )  # (b, K)
        order = counts.argsort(dim=1, descending=True, stable=True)[:, : max(opts["top_k"])]
        seconds = (time.perf_counter() - start) / len(ids)
        rows = [
            self.output.row(i, int(y), top.tolist(), r.tolist(), seconds, c.tolist(), m)
            for i, y, top, r, c, m in zip(
                ids, labels, order, radii, counts, samples or [None] * len(ids), strict=True
            )
        ]
        self.output.append(self._fd, rows)
        return radii

    def finish(self) -> None:
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
        output_dir: str | None = None,
        channels_last: bool = False,
        autocast: str | None = None,
        compile: bool = False,
        trust_checkpoint: bool = False,
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
            output_dir: where certify.tsv, counts.txt and the report go (default:
                ``runs/certify/<checkpoint>_<split>_n<n>_sigma<sigma>_k<k>``, one per run;
                ``<checkpoint>`` is its run, file name and the start of its sha256).
            channels_last: lay noisy batches out channels-last (faster for 3-channel conv
                nets on CPUs and with bf16 on GPUs; other noise layout, so other counts).
            autocast: run the base classifier's forward pass in ``bf16`` or ``fp16`` (the
                noise stays float32; other numerics, so other counts). The certificates hold
                for the classifier as it runs, in that precision.
            compile: ``torch.compile`` the base classifier (compiles on the first batches).
                With ``autocast bf16`` and ``channels_last`` on a GPU: 3.6x the original
                loop's throughput for a CIFAR ResNet-20 (``docs/performance.md``).
            trust_checkpoint: load a checkpoint that holds pickled Python objects (their
                loading can run any code: only for a file from a trusted source).
            sequential: sample each example in growing rounds and stop once every k is
                decided at every radius of ``radii`` (``docs/sequential.md``); ``n`` is then
                the most samples an example gets, and ``certify.tsv`` has their number.
            radii: the target radii of ``sequential`` (default: the report's radii 0 .. 2).

        Returns:
            True when every selected example is certified and the report is written.
        """
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
        weights, sha256 = load_weights(model, ckpt_path, trust_checkpoint)
        if output_dir is None:
            targets = {"seq": radii or "default"} if sequential else {}  # its own directory
            output_dir = default_output_dir(
                "certify", weights.name, split, n=n, sigma=sigma, k=top_k, **targets
            )
        dataset = split_dataset(datamodule, split)
        selected = select_examples(len(dataset), skip, max_examples)
        require_compiler(compile, self.strategy.root_device)
        metadata = {
            "n": n, "alpha": alpha, "sigma": sigma, "bounds": bounds, "top_k": list(top_k),
            "split": split, "skip": skip, "max_examples": max_examples, "seed": seed,
            "num_classes": num_classes, "examples": len(selected), "arch": arch,
            "checkpoint_sha256": sha256,
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
            print(startup_line(
                "certify", weights=weights, arch=arch, sigma=sigma, net=model.net,
                device=device_text(self),
                settings=dict(n=n, alpha=alpha, k=top_k, bounds=bounds, split=split,
                              examples=len(selected)),
                options=dict(batch_size=batch_size or "tuned", seed=seed,
                             channels_last=bool(channels_last), autocast=autocast,
                             compile=bool(compile)),
            ), flush=True)  # fmt: skip
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
