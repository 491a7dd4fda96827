"""Certified top-k accuracy measured while training: a Lightning callback (docs/training.md)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from certify.math.validation import (
    UsageError,
    check_alpha,
    check_bounds,
    check_int,
    check_radii,
    check_seed,
    check_sigma,
    check_top_k,
    default_top_k,
)
from certify.sampling.options import check_autocast
from certify.sampling.smoothing import SmoothedClassifier
from certify.training.metric import (
    CertifiedTopKAccuracy,
    define_steps,
    markdown_table,
    plural,
    radius_key,
    wandb_table,
)


class CertificationCallback(pl.Callback):
    """Certify an evenly spread subset of the validation split after validation epochs, each
    process its share (noise keyed by dataset index, exact metric: any process count gives
    the same numbers); logs ``val/certified_top{k}@{r}``, ``val/acr_top{k}``,
    ``val/certify_seconds`` (and, to W&B, the table ``val/certified_table`` on the same step).

    Args:
        top_k: the k values; ``None``: (1, 3, 5) below num_classes.
        radii: radii at which certified accuracy is logged.
        n: noisy samples per example (the most, when sequential).
        alpha: failure probability of each certificate.
        bounds: ``"simuem"`` or ``"binocp"``.
        batch_size: noisy samples per forward pass (``None``: the sampler's choice).
        num_examples: validation examples certified (``None``: all).
        every_n_epochs: certify after every n-th training epoch (always in ``validate``).
        last_epoch: also certify after the last training epoch.
        sigma: noise level; ``None``: the module's ``sigma``.
        seed: base seed of the noise.
        examples_per_call: examples handed to the sampler at once.
        channels_last: the sampler's ``channels_last`` option.
        autocast: ``"bf16"`` or ``"fp16"`` forward passes.
        sequential: certify in growing rounds (``docs/sequential.md``); the ACR is then a lower
            bound and ``val/certify_samples`` the mean samples per example.
    """

    def __init__(
        self,
        top_k: Sequence[int] | None = None,
        radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        n: int = 1000,
        alpha: float = 0.001,
        bounds: str = "simuem",
        batch_size: int | None = None,
        num_examples: int | None = 500,
        every_n_epochs: int = 1,
        last_epoch: bool = True,
        sigma: float | None = None,
        seed: int = 0,
        examples_per_call: int = 64,
        channels_last: bool = False,
        autocast: str | None = None,
        sequential: bool = False,
    ) -> None:
        super().__init__()
        self.top_k = None if top_k is None else check_top_k(top_k, None, name="top_k")
        self.radii = check_radii(radii)
        self.n = check_int(n, "n")
        self.alpha = check_alpha(alpha)
        self.bounds = check_bounds(bounds)
        if sequential and bounds != "simuem":
            raise UsageError(f"sequential certification bounds with simuem, got {bounds!r}")
        self.batch_size = check_int(batch_size, "batch_size", optional=True)
        self.num_examples = check_int(num_examples, "num_examples", optional=True)
        self.every_n_epochs = check_int(every_n_epochs, "every_n_epochs")
        self.examples_per_call = check_int(examples_per_call, "examples_per_call")
        self.sigma = None if sigma is None else check_sigma(sigma)
        self.seed, self.last_epoch = check_seed(seed), last_epoch
        self.autocast, self.autocast_dtype = autocast, check_autocast(autocast)
        self.channels_last, self.sequential = bool(channels_last), bool(sequential)
        self.indices: np.ndarray | None = None  # the validation examples certified
        self.dataset = None
        self.samples: list[int] = []  # per example, of the last sequential certification
        self.last_table: tuple | None = None  # (accuracy (K, R), acr (K,), fit epoch or None)
        self.certify_seconds = 0.0  # of the last fit
        self._fit_start: float | None = None
        self._first_epoch: int | None = None

    def check_module(self, pl_module: pl.LightningModule) -> None:
        """Refuse k values the module's classes cannot have (the CLI calls this at start-up)."""
        num_classes = getattr(pl_module, "num_classes", None)
        if not isinstance(num_classes, int) or not hasattr(pl_module, "net"):
            raise UsageError(
                "CertificationCallback needs a module with `net` and an integer `num_classes`"
            )
        top_k = default_top_k(num_classes) if self.top_k is None else self.top_k
        self.top_k = check_top_k(top_k, num_classes, name="CertificationCallback top_k")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        self.check_module(pl_module)
        check_sigma(self.sigma if self.sigma is not None else getattr(pl_module, "sigma", None))
        source = pl_module if trainer.datamodule is None else trainer.datamodule
        try:
            loader = source.val_dataloader()
        except Exception:  # the hook may be left unimplemented
            loader = None
        self.dataset = getattr(loader, "dataset", None)
        if self.dataset is None or len(self.dataset) == 0:
            raise UsageError("CertificationCallback: there is no validation data to certify")
        size = len(self.dataset)
        count = size if self.num_examples is None else min(self.num_examples, size)
        self.indices = np.unique(np.linspace(0, size - 1, count).round().astype(np.int64))
        keys = [f"val/{radius_key(k, r)}" for k in self.top_k for r in self.radii]
        for experiment in self._wandb(trainer):
            define_steps(experiment, keys)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start, self.certify_seconds = time.perf_counter(), 0.0
        self._first_epoch = None  # stays None when no epoch runs (a finished run resumed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_epoch = trainer.current_epoch  # after a resume, not 0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is None or self._first_epoch is None:
            return
        spent, total = self.certify_seconds, time.perf_counter() - self._fit_start
        epochs = max(1, trainer.current_epoch - self._first_epoch)  # run by this fit
        share = spent / max(total, 1e-9)
        metrics = {"fit/certify_seconds": spent, "fit/seconds": total, "fit/certify_share": share}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.global_rank == 0:
            self.print_table()
            print(
                f"Certification took {spent:.1f} s of the {total:.1f} s fit ({share:.0%}): "
                f"{spent / epochs:.2f} s per epoch of {total / epochs:.2f} s on average over "
                f"{plural(epochs, 'epoch')}"
            )

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != "fit":
            return True
        epoch = trainer.current_epoch + 1
        final = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or (self.last_epoch and final)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.indices is None or not self._due(trainer):
            return
        start = time.perf_counter()
        metric = self.certify_share(trainer, pl_module)
        with metric.sync_context():  # every process's examples
            accuracy, acr = metric.compute_table()  # (K, R), (K,)
        seconds = time.perf_counter() - start
        fitting = trainer.state.fn == "fit"
        self.certify_seconds += seconds if fitting else 0.0
        epoch = trainer.current_epoch if fitting else None
        for experiment in self._wandb(trainer):  # joins the row of the scalars logged next
            table = wandb_table(self.top_k, self.radii, accuracy.cpu(), acr.cpu(), epoch)
            experiment.log({"val/certified_table": table}, commit=False)
        # the same value on every process (summed over them already): the max keeps it as it
        # is, and a synced value is one Lightning need not warn about
        same = dict(sync_dist=True, reduce_fx="max")
        values = metric.keyed(accuracy, acr)
        pl_module.log_dict({f"val/{key}": value.float() for key, value in values.items()}, **same)
        pl_module.log("val/certify_seconds", seconds, **same)
        if self.sequential:  # the mean over all processes' examples
            local = torch.tensor([sum(self.samples), len(self.samples)], dtype=torch.float64)
            total, count = trainer.strategy.reduce(local.to(pl_module.device), reduce_op="sum")
            pl_module.log("val/certify_samples", float(total / count.clamp(min=1)), **same)
        self.last_table = (accuracy.cpu().numpy(), acr.cpu().numpy(), epoch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and trainer.global_rank == 0:
            self.print_table()

    def print_table(self) -> None:
        """Print the last certified top-k accuracy table (k by radius, with the ACR)."""
        if self.last_table is None:
            return
        accuracy, acr, epoch = self.last_table
        n = f"sequential, n_max = {self.n}" if self.sequential else f"n = {self.n}"
        at = "" if epoch is None else f", epoch {epoch}"
        examples = plural(len(self.indices), "validation example")
        description = f"smoothed classifier, {examples}, {n}, "
        description += f"alpha = {self.alpha:g}{at}"
        print(markdown_table(self.top_k, self.radii, accuracy, acr, description), end="")

    def certify_share(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """Certify this process's share of the examples into a fresh metric."""
        sigma = self.sigma if self.sigma is not None else float(pl_module.sigma)
        smoothed = SmoothedClassifier(
            pl_module.net, pl_module.num_classes, sigma,
            autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
        )  # fmt: skip
        metric = CertifiedTopKAccuracy(self.top_k, self.radii).to(pl_module.device)
        share = self.indices[trainer.global_rank :: trainer.world_size]
        step = self.examples_per_call
        calls = [share[i : i + step] for i in range(0, len(share), step)]
        if trainer.global_rank == 0 and trainer.progress_bar_callback is not None:
            from tqdm.auto import tqdm

            calls = tqdm(calls, desc="Certifying", leave=False, unit="chunk", dynamic_ncols=True)
        self.samples = []
        for chunk in calls:
            items = [self.dataset[int(i)] for i in chunk]
            x = torch.stack([torch.as_tensor(item[0]) for item in items])  # (b, C, H, W)
            labels = torch.tensor([int(item[1]) for item in items])  # (b,)
            # "validation" streams: never those `certify` uses for the same seed
            common = dict(
                batch_size=self.batch_size, seed=self.seed, example_ids=chunk.tolist(),
                purpose="validation",
            )  # fmt: skip
            if self.sequential:  # radius: the largest of `radii` certified
                cert = smoothed.certify_sequential(x, labels, self.top_k, self.radii, self.n,
                                                   self.alpha, **common)  # fmt: skip
                self.samples += cert.samples.tolist()
                radii = cert.radius  # (b, K)
            else:
                radii = smoothed.certify(
                    x, labels, self.top_k, self.n, self.alpha, self.bounds, **common
                )  # (b, K)
            metric.update(radii)
        return metric

    @staticmethod
    def _wandb(trainer: pl.Trainer) -> list:
        """The W&B runs of the trainer's loggers (on the first process; none elsewhere)."""
        loggers = trainer.loggers if trainer.global_rank == 0 else []
        return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]
