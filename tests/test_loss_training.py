"""Training with each loss through ``topk-smoothing fit``: the same logged keys whatever the loss,
the loss and its resolved settings in the run's config, one-line errors for bad settings, and
exact resume of a 2-process CPU DDP run (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
VARIANTS = {
    "gaussian": CONFIGS / "digits.yaml",
    "consistency": CONFIGS / "digits_consistency.yaml",
    "smoothadv": CONFIGS / "digits_smoothadv.yaml",
}
SHORT = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
SHORT += ["--trainer.log_every_n_steps", "1"]


def short_config(loss: str, folder: Path, certify: bool) -> Path:
    """The digits config of ``loss`` with a cheaper callback (every epoch, 10 images, n = 100),
    or with one ModelCheckpoint that keeps every epoch (``certify=False``)."""
    config = yaml.safe_load(VARIANTS[loss].read_text())
    callbacks = config["trainer"]["callbacks"]
    if certify:
        (callback,) = [c for c in callbacks if c["class_path"] == "certify.CertificationCallback"]
        callback["init_args"].update(n=100, num_examples=10, every_n_epochs=1)
    else:
        config["trainer"]["callbacks"] = [
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {
                    "filename": "epoch{epoch}",
                    "auto_insert_metric_name": False,
                    "save_top_k": -1,
                    "save_last": True,
                },
            }
        ]
    if loss == "smoothadv":  # epsilon differs between epochs: resuming must know the epoch
        config["model"]["init_args"].update(smoothadv_steps=1, smoothadv_warmup_epochs=2)
    path = folder / f"{loss}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_same_logged_keys_whatever_the_loss_and_the_config_names_the_loss(
    isolated_run, lightning_cli
):
    import wandb

    keys, configs = {}, {}
    for loss in VARIANTS:
        config = short_config(loss, isolated_run, certify=True)
        args = ["--config", config, "--trainer.max_epochs", "1", "--test_after_fit", "false"]
        try:
            cli = lightning_cli("fit", *args, *SHORT, "--trainer.enable_progress_bar", "false")
            experiment = cli.trainer.logger.experiment
            keys[loss] = set(experiment.summary.keys())
            configs[loss] = dict(experiment.config)["model"]["init_args"]
        finally:
            wandb.finish()
    assert keys["gaussian"] == keys["consistency"] == keys["smoothadv"]
    assert {"train/loss", "train/ce", "val/acc_top1", "val/acr_top3"} <= keys["gaussian"]
    assert "val/certified_top3@0.5" in keys["gaussian"]
    assert configs["gaussian"]["loss"] == "gaussian"
    assert configs["gaussian"]["num_noise_samples"] == 1
    assert configs["gaussian"]["consistency_lambda"] is None
    consistency = configs["consistency"]
    assert consistency["loss"] == "consistency" and consistency["num_noise_samples"] == 2
    assert (consistency["consistency_lambda"], consistency["consistency_eta"]) == (20.0, 0.5)
    smoothadv = configs["smoothadv"]
    assert smoothadv["loss"] == "smoothadv" and smoothadv["smoothadv_epsilon"] == 0.5
    assert (smoothadv["smoothadv_steps"], smoothadv["smoothadv_warmup_epochs"]) == (1, 2)


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("digits.yaml", ["--model.loss", "hinge"], 'Parser key "loss": Expected a typing.Lit'),
        (
            "digits.yaml",
            ["--model.smoothadv_epsilon", "0.5"],
            "smoothadv_epsilon applies to loss 'smoothadv' only, got 0.5 with loss 'gaussian'",
        ),
        (
            "digits_consistency.yaml",
            ["--model.num_noise_samples", "1"],
            "loss 'consistency' needs num_noise_samples >= 2",
        ),
        (
            "digits_consistency.yaml",
            ["--model.consistency_lambda", "-1"],
            "consistency_lambda must be a finite number >= 0, got -1.0",
        ),
        (
            "digits_smoothadv.yaml",
            ["--model.smoothadv_steps", "0"],
            "smoothadv_steps must be an integer >= 1, got 0",
        ),
    ],
)
def test_bad_loss_settings_fail_at_start_up_in_one_line(
    isolated_run, capsys, config, args, message
):
    assert main(["fit", "--config", str(CONFIGS / config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topk-smoothing fit: error: ") and err.count("\n") == 1
    assert message in err and not Path("runs").exists()


def ddp_fit(config: Path, folder: str, *more: str) -> None:
    command = [
        sys.executable, "-m", "certify", "fit", "--config", str(config),
        "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.max_epochs", "2", *SHORT, "--trainer.logger", "false",
        "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", folder, *more,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the launcher re-runs `-m certify`
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("loss", list(VARIANTS))
def test_two_process_ddp_training_resumes_exactly(isolated_run, loss):
    """Two epochs in one go equal the first epoch's checkpoint resumed for the second (noise,
    SmoothAdv's warmed-up epsilon and the data order included), on 2 processes."""
    config = short_config(loss, isolated_run, certify=False)
    ddp_fit(config, "a")
    ddp_fit(config, "b", "--ckpt_path", "a/checkpoints/epoch0.ckpt")

    def load(path: str) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)

    halfway, straight = load("a/checkpoints/epoch0.ckpt"), load("a/checkpoints/last.ckpt")
    resumed = load("b/checkpoints/last.ckpt")
    assert straight["epoch"] == resumed["epoch"] == 1 and halfway["epoch"] == 0
    assert straight["global_step"] == resumed["global_step"] == 4  # 2 batches per epoch
    assert straight["hyper_parameters"]["loss"] == resumed["hyper_parameters"]["loss"] == loss
    weights, resumed_weights = straight["state_dict"], resumed["state_dict"]
    assert weights.keys() == resumed_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], resumed_weights[key]), key
    assert not torch.equal(halfway["state_dict"]["net.1.fc.weight"], weights["net.1.fc.weight"])
