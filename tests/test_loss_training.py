"""Training with each loss: the same logged keys whatever the loss (live certification
included), and the loss's resolved settings among the hyperparameters the loggers receive.
(Exact 2-process resume with each loss: ``test_ddp_training.py``; bad settings at start-up:
``test_training.py``.)"""

import csv

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from certify import CertificationCallback
from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier

SETTINGS = {
    "gaussian": {},
    "consistency": {},
    "smoothadv": {"smoothadv_epsilon": 0.5, "smoothadv_steps": 1, "smoothadv_warmup_epochs": 2},
}


def fit_one_epoch(folder, loss: str) -> tuple[set[str], dict]:
    """The keys logged in one short epoch with ``loss``, and the hyperparameters logged."""
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = NoisyClassifier(
        "digits_cnn", 10, data.mean, data.std, top_k=(1, 3), loss=loss,
        data_kind=data.data_kind, **SETTINGS[loss],
    )  # fmt: skip
    certify = CertificationCallback(top_k=(1, 3), radii=(0.0, 0.5), n=100, num_examples=10)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
        log_every_n_steps=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[certify],
        logger=CSVLogger(folder, name=loss),
    )  # fmt: skip
    trainer.fit(model, data)
    with open(trainer.logger.log_dir + "/metrics.csv") as table:
        keys = set(next(csv.reader(table))) - {"epoch", "step"}
    return keys, dict(model.hparams_initial)


def test_same_logged_keys_whatever_the_loss_and_the_hparams_name_the_loss(tmp_path):
    keys, hparams = {}, {}
    for loss in SETTINGS:
        keys[loss], hparams[loss] = fit_one_epoch(tmp_path, loss)
    assert keys["gaussian"] == keys["consistency"] == keys["smoothadv"]
    assert {"train/loss", "train/ce", "val/acc_top1", "val/acr_top3"} <= keys["gaussian"]
    assert "val/certified_top3@0.5" in keys["gaussian"]
    gaussian, consistency, smoothadv = (hparams[loss] for loss in SETTINGS)
    assert gaussian["loss"] == "gaussian" and gaussian["num_noise_samples"] == 1
    assert gaussian["consistency_lambda"] is None and gaussian["smoothadv_steps"] is None
    assert consistency["loss"] == "consistency" and consistency["num_noise_samples"] == 2
    assert consistency["data_kind"] == "mnist"  # Jeong & Shin's MNIST lambda at sigma 0.25
    assert (consistency["consistency_lambda"], consistency["consistency_eta"]) == (10.0, 0.5)
    assert smoothadv["loss"] == "smoothadv" and smoothadv["smoothadv_epsilon"] == 0.5
    assert (smoothadv["smoothadv_steps"], smoothadv["smoothadv_warmup_epochs"]) == (1, 2)
