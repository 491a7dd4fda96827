"""``CertifyingTrainer``: a Lightning ``Trainer`` whose ``certify`` and ``predict`` are the
commands (LightningCLI makes their typed signatures the options; see ``docs/commands.md``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
)
from torch import nn

from certify.commands.countfile import format_counts
from certify.commands.outputs import RunOutput, data_identity
from certify.commands.predict import predict
from certify.commands.report import log_to_wandb, write_report
from certify.commands.task import (
    LoggersWhenSampling,
    SamplingTask,
    check_options,
    default_output_dir,
    record_sequential,
    sequential_line,
    sequential_targets,
    split_dataset,
)
from certify.math.validation import UsageError, check_sigma, check_top_k, default_top_k
from certify.training.metric import plural


class CertifyingTrainer(pl.Trainer):
    """A ``Trainer`` with ``certify`` and ``predict`` (which replaces ``Trainer.predict``)."""

    predict = predict

    def certify(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None, trust_checkpoint: bool = False, n: PositiveInt = 100_000,
        alpha: OpenUnitInterval = 0.001, k: PositiveInt | list[PositiveInt] | None = None,
        bounds: Literal["simuem", "binocp"] = "simuem", split: Literal["test", "val"] = "test",
        skip: PositiveInt = 1, max_examples: PositiveInt | None = None,
        batch_size: PositiveInt | None = None, seed: NonNegativeInt = 0,
        sigma: PositiveFloat | None = None, output_dir: str | None = None,
        channels_last: bool = False, autocast: Literal["bf16", "fp16"] | None = None,
        compile: bool = False, sequential: bool = False,
        radii: list[NonNegativeFloat] | None = None,
    ) -> bool:  # fmt: skip
        """Certified top-k radii of the true labels of a data split (resumable, sharded).

        Args:
            model: the trained classifier (its ``net``, ``num_classes`` and ``sigma``).
            datamodule: provides the split.
            ckpt_path: our Lightning checkpoint or one of Cohen et al.'s released models.
            trust_checkpoint: load a checkpoint holding pickled Python objects (trusted ones only).
            n: noisy samples per example (the most, with ``sequential``).
            alpha: failure probability of each certificate.
            k: one k (``3``) or several (``[1,3,5]``); default: 1, 3, 5 below the class count.
            bounds: ``simuem`` or ``binocp``.
            split: ``test`` or ``val``.
            skip: every ``skip``-th example of the split (the papers use 20).
            max_examples: at most this many examples (after ``skip``).
            batch_size: noisy samples per forward pass (default: the sampler's choice).
            seed: base seed of the noise; each example's stream is keyed by its index.
            sigma: noise level (default: the model's training sigma).
            output_dir: where the files go (default: ``runs/certify/<checkpoint>_<split>_...``).
            channels_last: channels-last noisy batches (another noise layout, other counts).
            autocast: the base classifier's forward pass in ``bf16`` or ``fp16``.
            compile: ``torch.compile`` the base classifier (compiles on the first batches).
            sequential: sample in growing rounds until every k is decided (docs/sequential.md).
            radii: the targets of ``sequential``, e.g. ``[0.25,0.5]`` (default: 0 .. 2).

        Returns:
            True when every selected example is certified and the report is written.
        """
        check_options(model, datamodule, alpha, seed, sigma, output_dir)
        if sequential and bounds != "simuem":
            raise UsageError(
                "--sequential true bounds with simuem (Clopper-Pearson per label), got bounds "
                f"{bounds!r}"
            )
        fixed = (
            "a fixed-n run certifies every radius (choose the report's radii with "
            "`topk-smoothing report --radii`)"
        )
        targets = sequential_targets(sequential, radii, fixed)
        top_k = check_top_k(default_top_k(int(model.num_classes)) if k is None else k,
                            int(model.num_classes))  # fmt: skip
        who, meta = self._load(model, ckpt_path, trust_checkpoint, sigma, compile)
        meta.update(n=n, alpha=alpha, bounds=bounds, top_k=list(top_k), split=split,
                    data=data_identity(datamodule), noise_purpose="certify")  # fmt: skip
        if autocast is not None or compile:  # recorded when on, as since they were added
            meta.update(autocast=autocast, compile=compile)
        if sequential:
            record_sequential(meta, targets)
        seq = {"seq": radii or "default"} if sequential else {}  # its own default directory
        where = default_output_dir("certify", who["name"], split, n=n, sigma=meta["sigma"],
                                   k=top_k, **seq)  # fmt: skip
        header = ["idx", "label", *(f"pred{i + 1}" for i in range(max(top_k)))]
        header += [*(f"radius_top{k}" for k in top_k), *["samples"][: int(sequential)], "seconds"]
        output = RunOutput(output_dir or where, "certify.json", meta, header)

        def step(smoothed, x, labels, ids):  # x (b, C, H, W), labels (b,)
            if sequential:
                cert = smoothed.certify_sequential(
                    x, labels, top_k, targets, n, alpha, batch_size, seed, example_ids=ids
                )
                counts, certified = cert.counts, cert.radius  # (b, c), (b, K)
            else:
                certified, counts = smoothed.certify(
                    x, labels, top_k, n, alpha, bounds, batch_size, seed, ids, return_counts=True
                )  # (b, K), (b, c)
            order = counts.argsort(dim=1, descending=True, stable=True)[:, : max(top_k)]
            samples = [[s] for s in cert.samples.tolist()] if sequential else None
            return order, certified, counts, samples  # (b, k), (b, K), (b, c), [[samples]]

        def finish(rows: list[list[str]]) -> None:  # the part lines' fields, by index
            lines = ["\t".join(f) + "\n" for f in [header, *(f[:-1] for f in rows)]]
            output.write("certify.tsv", lines)
            if not sequential:  # stopped counts would give `radius` no certificate
                counts = np.array([f[-1].split() for f in rows], dtype=np.int64)  # (N, c)
                labels = np.array([f[1] for f in rows], dtype=np.int64)  # (N,)
                output.write("counts.txt", [format_counts(counts, labels)])
            log_to_wandb(self.loggers, write_report(output.directory / "certify.tsv"))
            seconds = np.array([float(f[-2]) for f in rows])  # (N,)
            print((output.directory / "report.md").read_text(), end="")
            print(
                f"certify: {plural(len(rows), 'example')}, {seconds.mean():.3f} s each on average "
                f"({seconds.sum():.1f} s in all); wrote certify.tsv, "
                f"{'' if sequential else 'counts.txt, '}report.md, report.csv "
                f"and certified_accuracy.png to {output.directory}"
            )

        if self.is_global_zero and sequential:
            print(sequential_line("certify", n, targets))
        per_step = 64 if sequential else max(1, min(64, (batch_size or 2048) // n))
        task = SamplingTask("certify", output, split_dataset(datamodule, split), step, finish,
                            per_step, batch_size)  # fmt: skip
        settings = dict(n=n, alpha=alpha, k=top_k, bounds=bounds, split=split)
        return self._sample(model, who, skip, max_examples, f"n = {n}", task, settings,
                            seed, channels_last, autocast, compile, "certify.tsv")  # fmt: skip

    def _load(self, model, ckpt_path, trust: bool, sigma, compile: bool) -> tuple[dict, dict]:
        """Load ``model.net``: ``who`` (the start-up line's, the directory's) and the settings."""
        from certify.commands.checkpoints import load_network_weights
        from certify.sampling.options import check_compile

        hparams = getattr(model, "hparams", {})
        pretrained = hparams.get("weights")
        if ckpt_path is None and pretrained is None:
            raise UsageError(
                "no --ckpt_path and no --model.weights: the network has its random initial "
                "weights; pass a checkpoint (--ckpt_path) or pretrained weights (--model.weights)"
            )
        kind = sha256 = None
        if ckpt_path is None:
            description = f"none (pretrained weights {pretrained})"
            name = Path(str(pretrained)).name.split(".")[0]
        else:
            kind = load_network_weights(model.net, ckpt_path, hparams.get("arch"), trust)
            path = Path(ckpt_path)  # the whole file: torch.load reads it all anyway
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            fmt = {"lightning": "Lightning", "cohen": "Cohen et al.'s format"}.get(kind, kind)
            description = f"{ckpt_path} ({fmt}, sha256 {sha256[:12]})"
            name = path.name.split(".")[0] or path.name
            if path.parent.name == "checkpoints":  # runs/<run>/checkpoints/<file>
                name = f"{path.parent.parent.name}-{name}"
            name += f"-{sha256[:8]}"
        if compile:
            try:
                check_compile(self.strategy.root_device)
            except ValueError as err:
                raise UsageError(str(err)) from None
        trained = float(model.sigma) if kind == "lightning" else None  # only ours record it
        who = dict(description=description, name=name, trained=trained)
        meta = {
            "sigma": check_sigma(float(model.sigma) if sigma is None else sigma),
            "num_classes": int(model.num_classes), "arch": hparams.get("arch"),
            "checkpoint_sha256": sha256, "noise_device": self.strategy.root_device.type,
        }  # fmt: skip
        return who, meta

    def _sample(self, model, who: dict, skip: int, max_examples: int | None, sizes: str,
                task: SamplingTask, settings: dict, seed: int, channels_last: bool, autocast,
                compile: bool, result: str) -> bool:  # fmt: skip
        """Prepare or resume ``task.output``, print the start-up line, sample, merge: ``result``?"""
        task.selected = list(range(0, len(task.dataset), skip))[:max_examples]
        total, meta, where = len(task.selected), task.output.metadata, task.output.directory
        meta.update(skip=skip, max_examples=max_examples, seed=seed, examples=total,
                    channels_last=channels_last)  # fmt: skip
        task.output.prepare()
        done = sum(i in task.output.read_parts() for i in task.selected)
        if self.is_global_zero:
            sigma, trained = meta["sigma"], who["trained"]
            trained = (
                "the weights do not record a training sigma" if trained is None
                else "as trained" if abs(trained - sigma) <= 1e-12 * max(1.0, sigma)
                else f"NOT the training sigma {trained:g}"
            )  # fmt: skip
            device = self.strategy.root_device
            if self.world_size > 1:
                device = f"{device.type} x {self.world_size} processes"
            options = dict(batch_size=task.batch_size or "automatic", seed=seed,
                           channels_last=channels_last, autocast=autocast,
                           compile=compile)  # fmt: skip
            settings, options = (
                ", ".join(f"{key} {_text(value)}" for key, value in values.items())
                for values in (dict(settings, examples=total), options)
            )
            print(
                f"{task.command}: checkpoint {who['description']}; arch {meta['arch'] or 'unknown'}"
                f"; sigma {sigma:g} ({trained}); normalisation {normalisation(model.net)}; "
                f"{settings}; device {device}; {options}",
                flush=True,
            )
            print(f"{task.command}: " + (
                f"{'the example is' if total == 1 else f'all {total} examples are'} already in "
                f"{where}; merging" if done == total
                else f"{done} of {total} examples already in {where}, resuming" if done
                else f"{plural(total, 'example')}, {sizes}, into {where}"
            ))  # fmt: skip
        if done < total:
            task.net = model.net
            bar = self.progress_bar_callback  # its "Predicting DataLoader 0" would count batches
            task.progress = bar is not None and bar.is_enabled
            try:
                if task.progress:
                    bar.disable()  # the task's own bar counts examples
                pl.Trainer.predict(self, task, return_predictions=False)
            finally:
                if task.bar is not None:
                    task.bar.close()
                if task.progress:
                    bar.enable()
        elif self.is_global_zero:  # the loggers a sampling run would have attached
            for callback in [c for c in self.callbacks if isinstance(c, LoggersWhenSampling)]:
                callback.on_predict_start(self, task)
            task.merge()
        return (where / result).is_file()


def normalisation(net: nn.Module) -> str:
    """``mean (...) std (...)`` of the network's first module, or what stands there instead."""
    first = net[0] if isinstance(net, nn.Sequential) and len(net) else None
    mean, std = getattr(first, "mean", None), getattr(first, "std", None)
    if mean is None or std is None:
        return f"none as first module ({type(first or net).__name__})"
    return " ".join(
        f"{name} ({', '.join(f'{v:.4g}' for v in t.flatten().tolist())})"
        for name, t in (("mean", mean), ("std", std))
    )


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)
