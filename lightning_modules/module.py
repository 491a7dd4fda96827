"""The LightningModule that trains a base classifier under Gaussian noise (Cohen et al. 2019).

Every batch gets fresh noise N(0, sigma^2 I) in [0, 1] pixel space; the network's first module
normalises, so the noise is never added after normalisation. The training loss is Gaussian
augmentation, consistency regularization or SmoothAdv (``lightning_modules/losses.py``). The
same noise level is used on the validation and test inputs, so the logged accuracies are those
of the base classifier f under the noise its smoothed version g will be certified with.

Noise comes from the module's own generators, one per process: with DDP every process adds
its own noise to its share of the batch (seeded from the run's seed and the process's global
rank). Training noise continues across checkpoints (every process's generator state is saved
and restored); validation and test noise restart from the same seed at every epoch.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from certify.math.validation import check_sigma, check_top_k
from lightning_modules.losses import (
    consistency_loss,
    loss_settings,
    noisy_cross_entropy,
    smoothadv_attack,
    warmed_up_epsilon,
)
from lightning_modules.models import build_network

RNG_KEY = "rng_states"
#: The streams of the module's noise generators, mixed with the run's seed and the rank.
NOISE_STREAMS = {"train": 0, "eval": 1}


def noise_seed(run_seed: int, rank: int, stream: str) -> int:
    """Seed of a process's noise generator: distinct for every run seed, rank and stream."""
    words = np.random.SeedSequence([run_seed, rank, NOISE_STREAMS[stream]]).generate_state(2)
    return int(words[0]) | int(words[1]) << 32


def rng_states() -> dict[str, Any]:
    """The states of the global random number generators of this process.

    Plain tensors, lists and numbers only, so that ``torch.load(weights_only=True)`` reads them.
    """
    # numpy's legacy global generator: the one Lightning's seed_everything seeds.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    states = {
        "torch": torch.get_rng_state(),
        "numpy": (name, keys.tolist(), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    keys = np.asarray(keys, dtype=np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def all_processes(states: dict[str, Any]) -> list[dict[str, Any]]:
    """``states`` of every process of a distributed run, by global rank (``[states]`` alone)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, states)
    return gathered


class NoisyClassifier(LightningModule):
    """Trains ``net`` on inputs plus fresh Gaussian noise of level ``sigma``, with one of three
    losses (``loss``). ``m`` is ``num_noise_samples``; a batch of B images costs forward and
    backward passes on ``m * B`` noisy images, and SmoothAdv's attack adds ``steps`` more
    (forward and backward to the input only, on the same ``m * B`` images):

    - ``"gaussian"`` (default): cross-entropy on the noisy inputs, averaged over the ``m``
      copies (default m = 1: Cohen et al., ICML 2019). Cost per step: 1 pass on ``m * B``.
    - ``"consistency"``: Jeong & Shin, "Consistency Regularization for Certified Robustness of
      Smoothed Classifiers", NeurIPS 2020. ``m`` noisy copies of each input (default 2); the
      loss is the cross-entropy averaged over the copies, plus ``consistency_lambda`` times the
      mean over copies of KL(p_avg || p_i) (p_i the softmax of copy i, p_avg their average),
      plus ``consistency_eta`` times the entropy of p_avg. Defaults: eta = 0.5; lambda = 20
      for sigma < 0.5 (the paper's 0.25) and 10 from 0.5 up (its 0.5 and 1.0). Cost per step: 1
      pass on ``m * B`` (the paper splits its batch of 256 into m copies of 128 images: set
      ``data.batch_size`` to 256 / m to match).
    - ``"smoothadv"``: Salman et al., "Provably Robust Deep Learning via Adversarially Trained
      Smoothed Classifiers", NeurIPS 2019 (SmoothAdv-PGD, trained on all noise samples). The
      same ``m`` noise samples (default 2) serve an l2 PGD attack of ``smoothadv_steps``
      (default 10) steps of size 2 epsilon / steps on ``-log(mean_i softmax(f(x' + noise_i))_y)``
      within ``||x' - x|| <= epsilon`` and [0, 1], run with ``net`` in eval mode; then the loss is
      the cross-entropy averaged over the ``m`` copies ``x' + noise_i``. epsilon grows linearly
      over the first ``smoothadv_warmup_epochs`` (default 10) epochs, ``min(epsilon, (epoch + 1)
      * epsilon / warmup)``, up to ``smoothadv_epsilon`` (default 1.0, pixel units in [0, 1];
      the paper's grid: 0.25, 0.5, 1, 2). Cost per step: ``steps + 1`` passes on ``m * B``.

    Every loss draws its noise through ``add_noise``. The logged keys are the same whatever the
    loss: ``train/loss`` (the objective) and ``train/ce`` (the cross-entropy part), then
    ``val/...`` and ``test/...`` (one noisy copy each).

    Attributes used by certification: ``net`` (``(B, C, H, W)`` pixels in [0, 1] -> ``(B,
    num_classes)`` logits, normalisation first), ``sigma`` (float) and ``num_classes`` (int).

    Args:
        arch: network name in ``lightning_modules.models.MODELS`` (e.g. ``digits_cnn``,
            ``cifar_resnet110``, ``resnet50``).
        num_classes: number of labels (linked from the datamodule by the CLI).
        mean: per-channel mean of the normalisation layer (linked from the datamodule).
        std: per-channel standard deviation of the normalisation layer (linked from the datamodule).
        sigma: standard deviation of the Gaussian noise, in [0, 1] pixel units.
        weights: pretrained weights: a torchvision weights name of ``arch`` (``IMAGENET1K_V2``,
            ``DEFAULT``) or a state dict file; ``None`` trains from scratch. To reload a trained
            checkpoint offline, pass ``weights=None`` to ``load_from_checkpoint``.
        top_k: the k of the logged top-k accuracies ``{val,test}/acc_top{k}``; those not below
            ``num_classes`` are dropped (``dropped_top_k``).
        optimizer: builds the optimizer from the parameters. Default: the published recipe,
            SGD with lr 0.1, momentum 0.9 and weight decay 1e-4.
        lr_scheduler: builds the (per-epoch) LR schedule from the optimizer, or ``None``.
            Default: the published recipe, LR x 0.1 every 30 epochs.
        loss: ``"gaussian"``, ``"consistency"`` or ``"smoothadv"`` (above).
        num_noise_samples: m, the noisy copies of each training image; ``None``: 1 for
            ``"gaussian"``, 2 for the others (``"consistency"`` needs at least 2).
        consistency_lambda: weight of the KL term; ``None``: 20 if sigma < 0.5, else 10.
        consistency_eta: weight of the entropy term; ``None``: 0.5.
        smoothadv_epsilon: l2 radius of the attack in pixel units; ``None``: 1.0.
        smoothadv_steps: PGD steps per training step; ``None``: 10.
        smoothadv_warmup_epochs: epochs over which epsilon grows to its value (0: none);
            ``None``: 10.
        channels_last: keep the network's weights and the noisy images channels-last (for
            convolutional networks on GPUs, with ``precision: bf16-mixed``; the same noise
            and the same training, laid out differently in memory).

    Settings of a loss other than ``loss`` are refused (``None`` is their only value). The
    resolved values are stored in ``hparams`` (and so in checkpoints and the logged config).

    Example:
        >>> model = NoisyClassifier("digits_cnn", 10, (0.3,), (0.4,), sigma=0.5, loss="consistency")
        >>> model.loss_settings["consistency_lambda"], model.loss_settings["num_noise_samples"]
        (10.0, 2)
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        sigma: float = 0.25,
        weights: str | None = None,
        top_k: Sequence[int] = (1, 5),
        optimizer: OptimizerCallable = lambda params: torch.optim.SGD(
            params, lr=0.1, momentum=0.9, weight_decay=1e-4
        ),
        lr_scheduler: LRSchedulerCallable | None = lambda optimizer: (
            torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
        ),
        loss: Literal["gaussian", "consistency", "smoothadv"] = "gaussian",
        num_noise_samples: int | None = None,
        consistency_lambda: float | None = None,
        consistency_eta: float | None = None,
        smoothadv_epsilon: float | None = None,
        smoothadv_steps: int | None = None,
        smoothadv_warmup_epochs: int | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key in ("optimizer", "lr_scheduler"):
            # From the CLI these are config dicts (resume re-reads them from the checkpoint);
            # code given in Python (functions, lambdas) cannot be saved in a checkpoint.
            if callable(self.hparams.get(key)):
                del self.hparams[key]
        self.sigma = check_sigma(sigma)
        self.loss = loss
        # The papers' defaults replace None; the resolved values are the run's hyperparameters
        # (in the checkpoint and, through the CLI, in the logged config).
        self.loss_settings = loss_settings(
            loss,
            self.sigma,
            num_noise_samples=num_noise_samples,
            consistency_lambda=consistency_lambda,
            consistency_eta=consistency_eta,
            smoothadv_epsilon=smoothadv_epsilon,
            smoothadv_steps=smoothadv_steps,
            smoothadv_warmup_epochs=smoothadv_warmup_epochs,
        )
        self.hparams.update(self.loss_settings)
        # Lightning logs hparams_initial, its copy of the hyperparameters as first saved: the
        # logged ones are the resolved ones too.
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.num_classes = num_classes
        # k values the data cannot have (k >= num_classes: a fine-tuning set with few classes)
        # are dropped; the CLI names them in a note at start-up.
        top_k = check_top_k(tuple(top_k), None, name="model.top_k")
        self.top_k = tuple(k for k in top_k if k < num_classes)
        self.dropped_top_k = tuple(k for k in top_k if k >= num_classes)
        if not self.top_k:
            raise ValueError(
                f"model.top_k: no k below the number of classes c = {num_classes}, got "
                f"{list(top_k)}"
            )
        self.net = build_network(arch, num_classes, tuple(mean), tuple(std), weights)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.val_metrics = self._accuracies("val/")
        self.test_metrics = self._accuracies("test/")
        self._noise: dict[str, torch.Generator] = {}
        self._resume_rng: list[dict[str, Any]] | None = None

    def _accuracies(self, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                f"acc_top{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro")
                for k in self.top_k
            },
            prefix=prefix,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the base classifier on (clean) pixels ``x`` ``(B, C, H, W)``."""
        return self.net(x)  # (B, num_classes)

    def add_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus fresh N(0, sigma^2) noise, in pixel space and in x's (float) dtype.

        In training mode the noise comes from this process's training generator, otherwise
        from its evaluation generator (``NOISE_STREAMS``).
        """
        generator = self._generator("train" if self.training else "eval", x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noisy = x + self.sigma * noise  # (B, C, H, W)
        if self.channels_last and noisy.ndim == 4:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return noisy

    def _generator(self, stream: str, device: torch.device) -> torch.Generator:
        generator = self._noise.get(stream)
        if generator is None or generator.device != device:
            generator = torch.Generator(device=device)
            generator.manual_seed(noise_seed(torch.initial_seed(), self.global_rank, stream))
            self._noise[stream] = generator
        return generator

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch  # (B, C, H, W), (B,)
        settings = self.loss_settings
        m = settings["num_noise_samples"]
        copies = x.repeat(m, *[1] * (x.dim() - 1))  # (m * B, C, H, W), copy-major
        if self.loss == "smoothadv":
            noise = self.add_noise(torch.zeros_like(copies))  # (m * B, C, H, W): sigma * N(0, I)
            epsilon = warmed_up_epsilon(
                settings["smoothadv_epsilon"],
                settings["smoothadv_warmup_epochs"],
                self.current_epoch,
            )
            x = smoothadv_attack(
                self.net, x, y, noise.view(m, *x.shape), epsilon, settings["smoothadv_steps"]
            )  # (B, C, H, W)
            noisy = x.repeat(m, *[1] * (x.dim() - 1)) + noise  # (m * B, C, H, W)
        else:
            noisy = self.add_noise(copies)  # (m * B, C, H, W)
        logits = self.net(noisy)  # (m * B, num_classes)
        if self.loss == "consistency":
            lam, eta = settings["consistency_lambda"], settings["consistency_eta"]
            loss, ce = consistency_loss(logits, y, lam, eta)
        else:
            loss = ce = noisy_cross_entropy(logits, y)
        # The same keys whatever the loss: the objective, and the cross-entropy on the noisy
        # training inputs (equal for "gaussian" and "smoothadv").
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/ce", ce)
        return loss

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> None:
        x, y = batch  # (B, C, H, W), (B,)
        logits = self.net(self.add_noise(x))  # (B, num_classes)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.net(x)  # (B, num_classes)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "epoch"}
        if isinstance(scheduler["scheduler"], ReduceLROnPlateau):
            scheduler["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # Evaluation noise restarts every epoch: the same inputs get the same noise each time.
    def on_validation_epoch_start(self) -> None:
        self._noise.pop("eval", None)

    def on_test_epoch_start(self) -> None:
        self._noise.pop("eval", None)

    # Exact resume: the noise, the shuffling and dropout continue where the checkpoint left off.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random states of every process (``checkpoint["rng_states"][rank]``)."""
        states = rng_states()
        if "train" in self._noise:
            states["noise"] = self._noise["train"].get_state()
        checkpoint[RNG_KEY] = all_processes(states)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RNG_KEY)
        self._resume_rng = [saved] if isinstance(saved, dict) else saved

    def on_fit_start(self) -> None:
        # Before the first training batches are drawn (Lightning isolates the sanity check's
        # random numbers, and creates the first epoch's loader iterator before on_train_start).
        self._noise.clear()  # a new fit starts the streams from the run's seed
        saved, self._resume_rng = self._resume_rng, None
        if not saved:
            return
        rank, world = self.global_rank, self.trainer.world_size
        if len(saved) != world and rank == 0:
            print(
                f"note: the checkpoint holds the random states of {len(saved)} process(es), "
                f"this run has {world}: training continues, but not as an uninterrupted run "
                "would",
                file=sys.stderr,
            )
        states = saved[rank % len(saved)]
        set_rng_states(states)
        if "noise" in states and len(saved) == world:
            self._generator("train", self.device).set_state(states["noise"])
