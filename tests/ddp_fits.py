"""Short fits of the digits CNN on 2 CPU processes (DDP, gloo), every loss, in one launch.

``python tests/ddp_fits.py OUT`` runs, for each loss, ``OUT/<loss>/straight`` (2 epochs) and
``OUT/<loss>/halves`` (1 epoch, then resumed from its ``last.ckpt`` to 2 epochs), 2 training
batches per epoch. Lightning's launcher starts the second process by running this script again;
both processes then run every fit. Each process writes the training noise it added in an epoch
to ``noise-rank{r}-epoch{e}.pt`` in the fit's folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier

LOSSES = {
    "gaussian": {},
    "consistency": {},
    "smoothadv": {"smoothadv_steps": 1, "smoothadv_warmup_epochs": 2},  # epsilon per epoch
}


class RecordingClassifier(NoisyClassifier):
    """Keeps the training noise it adds (the noise itself is the module's)."""

    def add_noise(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        noisy = super().add_noise(x, index)
        if self.training:
            self.__dict__.setdefault("recorded", []).append((noisy - x).detach())
        return noisy

    def on_train_epoch_end(self) -> None:
        name = f"noise-rank{self.global_rank}-epoch{self.current_epoch}.pt"
        torch.save(self.__dict__.pop("recorded", []), Path(self.trainer.default_root_dir, name))


def fit(folder: Path, loss: str, epochs: int, ckpt_path: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)  # both processes write into it
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32)
    model = RecordingClassifier(
        "digits_cnn", data.num_classes, data.mean, data.std, top_k=(1, 3), loss=loss,
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3), **LOSSES[loss],
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, limit_train_batches=2,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
        callbacks=[ModelCheckpoint(save_top_k=-1)],  # epoch=0-step=2.ckpt, epoch=1-step=4.ckpt
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for loss in LOSSES:
        fit(out / loss / "straight", loss, 2)
        fit(out / loss / "halves", loss, 1)
        fit(out / loss / "halves", loss, 2, out / loss / "halves/checkpoints/epoch=0-step=2.ckpt")
