"""The LightningModule that trains a base classifier under Gaussian noise (Cohen et al. 2019);
its noise streams: docs/training.md#noise."""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt, restricted_number_type
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from certify.math.validation import UsageError, check_sigma, check_top_k
from lightning_modules import losses
from lightning_modules.models import build_network

NonNegativeFinite = restricted_number_type("NonNegativeFinite", float, [(">=", 0), ("<", 1e999)])


def seed_of(key: list[int]) -> np.uint64:
    return np.random.SeedSequence(key).generate_state(1, np.uint64)[0]


class NoisyClassifier(LightningModule):
    """Trains ``net`` on noisy images; logs ``train/{loss,ce}``, ``{val,test}/{loss,acc_top{k}}``.

    Validation and test batches ``(x, y, index)`` (the datamodules' evaluation loaders) get the
    noise of each example's own generator, seeded by the run's seed and ``index``, and the
    metrics are sums over examples: any number of processes logs the same values.

    Args:
        arch: network name in ``lightning_modules.models.MODELS``.
        num_classes: number of labels (linked from the datamodule).
        mean: per-channel mean of the normalisation layer (linked from the datamodule).
        std: per-channel standard deviation of the normalisation layer (linked likewise).
        sigma: standard deviation of the Gaussian noise, in [0, 1] pixel units.
        weights: torchvision weights name of ``arch`` or a state dict file; None: from scratch.
        top_k: the k of the logged top-k accuracies (those >= num_classes are dropped).
        optimizer: the optimizer. Default: SGD, lr 0.1, momentum 0.9, weight decay 1e-4.
        lr_scheduler: the per-epoch LR schedule, or None. Default: LR x 0.1 every 30 epochs.
        loss: ``gaussian``, ``consistency`` or ``smoothadv``.
        num_noise_samples: noisy copies m per image; None: 1 for gaussian, else 2.
        consistency_lambda: weight of the KL term; None: Jeong & Shin's for ``data_kind``, below
            sigma = 0.5 / from 0.5 up: mnist 10 / 5, cifar10 20 / 10, imagenet 10 / 5.
        consistency_eta: weight of the entropy term; None: 0.5.
        smoothadv_epsilon: l2 radius of the attack in pixel units; None: 1.0.
        smoothadv_steps: PGD steps per training step; None: 10.
        smoothadv_warmup_epochs: epochs over which epsilon grows linearly (0: none); None: 10.
        channels_last: channels-last weights and inputs (convolutional networks on GPUs).
        data_kind: ``mnist``, ``cifar10`` or ``imagenet`` (linked from the datamodule): whose
            published consistency settings are the defaults.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        sigma: PositiveFloat = 0.25,
        weights: str | None = None,
        top_k: Sequence[PositiveInt] = (1, 5),
        optimizer: OptimizerCallable = lambda params: torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=1e-4
        ),
        lr_scheduler: LRSchedulerCallable | None = lambda optimizer: (
            torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
        ),
        loss: Literal["gaussian", "consistency", "smoothadv"] = "gaussian",
        num_noise_samples: PositiveInt | None = None,
        consistency_lambda: NonNegativeFinite | None = None,
        consistency_eta: NonNegativeFinite | None = None,
        smoothadv_epsilon: NonNegativeFinite | None = None,
        smoothadv_steps: PositiveInt | None = None,
        smoothadv_warmup_epochs: NonNegativeInt | None = None,
        channels_last: bool = False,
        data_kind: Literal["mnist", "cifar10", "imagenet"] = "cifar10",
    ) -> None:
        super().__init__()
        self.sigma, self.loss, self.num_classes = check_sigma(sigma), loss, num_classes
        self.save_hyperparameters()
        for key in ("optimizer", "lr_scheduler"):  # Python functions cannot be checkpointed
            if callable(self.hparams.get(key)):  # (the CLI's config dicts are kept)
                del self.hparams[key]
        given = {key: self.hparams.get(key) for key in losses.SETTINGS}
        self.loss_settings = losses.loss_settings(loss, self.sigma, data_kind, **given)
        top_k = check_top_k(tuple(top_k), None, name="model.top_k")
        self.top_k = tuple(k for k in top_k if k < num_classes)
        self.dropped_top_k = tuple(k for k in top_k if k >= num_classes)
        if not self.top_k:
            c = num_classes
            raise UsageError(f"model.top_k: no k below the number of classes c = {c}, got {top_k}")
        # Resolved settings as builtin numbers (not jsonargparse's types), also in the logged copy.
        self.hparams.update(sigma=self.sigma, top_k=list(top_k), **self.loss_settings)
        self._hparams_initial = copy.deepcopy(self._hparams)
        net = build_network(arch, num_classes, tuple(mean), tuple(std), weights)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        top = {f"acc_top{k}": MulticlassAccuracy(num_classes, k, "micro") for k in self.top_k}
        self.val_metrics = MetricCollection(top, prefix="val/")
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        # over examples and processes; a NaN loss stays NaN (a diverged model shows)
        self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(2))
        self._noise, self._resume_rng = {}, None  # stream -> torch.Generator; states to resume

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) clean pixels -> (B, num_classes)

    def add_noise(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` plus N(0, sigma^2) noise: in training mode from this process's training stream;
        else example ``index[b]``'s own draw for the run's seed (without ``index``: a stream of
        this process)."""
        if self.training or index is None:
            generator = self._generator("train" if self.training else "eval", x.device)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            noise = torch.empty_like(x)  # (B, C, H, W)
            generator = torch.Generator(device=x.device)
            for row, i in zip(noise, index.tolist(), strict=True):
                key = [torch.initial_seed(), int(i), 2]  # 2: not a per-rank stream's key
                row.normal_(generator=generator.manual_seed(int(seed_of(key))))
        noisy = x + self.sigma * noise  # (B, C, H, W)
        channels_last = self.channels_last and noisy.ndim == 4
        return noisy.contiguous(memory_format=torch.channels_last) if channels_last else noisy

    def _generator(self, stream: str, device: torch.device) -> torch.Generator:
        generator = self._noise.get(stream)
        if generator is None or generator.device != device:
            key = [torch.initial_seed(), self.global_rank, ("train", "eval").index(stream)]
            generator = torch.Generator(device=device).manual_seed(int(seed_of(key)))
            self._noise[stream] = generator
        return generator

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch  # (B, C, H, W), (B,)
        s, m = self.loss_settings, self.loss_settings["num_noise_samples"]
        if self.loss == "smoothadv":
            noise = self.add_noise(torch.zeros_like(x).repeat(m, 1, 1, 1))  # (m * B, C, H, W)
            noise = noise.view(m, *x.shape)  # (m, B, C, H, W)
            epsilon = losses.warmed_up_epsilon(
                s["smoothadv_epsilon"], s["smoothadv_warmup_epochs"], self.current_epoch
            )
            x = losses.smoothadv_attack(self.net, x, y, noise, epsilon, s["smoothadv_steps"])
            noisy = (x.unsqueeze(0) + noise).flatten(0, 1)  # (m * B, C, H, W), copy-major
        else:
            noisy = self.add_noise(x.repeat(m, 1, 1, 1))  # (m * B, C, H, W), copy-major
        logits = self.net(noisy)  # (m * B, num_classes)
        if self.loss == "consistency":
            lam, eta = s["consistency_lambda"], s["consistency_eta"]
            loss, ce = losses.consistency_loss(logits, y, lam, eta)
        else:
            loss = ce = losses.noisy_cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, *index = batch  # (B, C, H, W), (B,), the examples' indices (B,) if given
        stage = "test" if self.trainer.testing else "val"
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        logits = self.net(self.add_noise(x, *index))  # (B, num_classes)
        loss.update(F.cross_entropy(logits, y, reduction="none"))  # (B,)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", loss)
        self.log_dict(metrics, prog_bar=True)

    test_step = validation_step

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x)  # (B, num_classes)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)  # "monitor": for ReduceLROnPlateau only
        config = {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_validation_epoch_start(self) -> None:
        self._noise.pop("eval", None)  # the same inputs get the same noise every epoch

    on_test_epoch_start = on_validation_epoch_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every process's random states in ``checkpoint["rng_states"][rank]``: exact resume."""
        name, keys, *rest = np.random.get_state()  # noqa: NPY002  (a list: weights-only loads)
        states = {"torch": torch.get_rng_state(), "python": random.getstate()}
        states["numpy"] = (name, keys.tolist(), *rest)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()  # this process's device
        if "train" in self._noise:
            states["noise"] = self._noise["train"].get_state()
        gathered = [states]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
        checkpoint["rng_states"] = gathered

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resume_rng = checkpoint.get("rng_states")

    def on_fit_start(self) -> None:
        # Before the first batch is drawn (the sanity check's random numbers are isolated).
        self._noise.clear()  # a new fit starts the streams from the run's seed
        saved, self._resume_rng = self._resume_rng, None
        if not saved:
            return
        rank, world = self.global_rank, self.trainer.world_size
        if len(saved) != world and rank == 0:
            print(f"note: the checkpoint holds the random states of {len(saved)} process(es), this "
                  f"run has {world}: training continues, but not as an uninterrupted run would",
                  file=sys.stderr)  # fmt: skip
        states = saved[rank % len(saved)]
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))  # noqa: NPY002
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
        if "noise" in states and len(saved) == world:
            self._generator("train", self.device).set_state(states["noise"])
