"""``topk-smoothing fit`` on digits: W&B offline, checkpoints, test, resume; exact resume; and
the one-line errors of bad settings at start-up."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from certify.commands.cli import main
from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier
from tests.messages import assert_names
from tests.wandb_records import history

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DIGITS = str(CONFIGS / "digits.yaml")
SHORT = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]


def test_fit_logs_to_wandb_checkpoints_tests_and_resumes_its_run(isolated_run, lightning_cli):
    """Two short epochs with live certification, then the test of the best checkpoint: the
    run's folder holds both checkpoints and its reusable config.yaml, the offline W&B run the
    resolved config and the training, validation, certification and test metrics. The last
    checkpoint reloads, ``test`` runs on it, and resuming continues the run: its folder, its
    W&B id, and the best epoch over all epochs."""
    import wandb

    config = yaml.safe_load(Path(DIGITS).read_text())
    for callback in config["trainer"]["callbacks"]:  # a cheaper certification, same callback
        if callback["class_path"] == "certify.CertificationCallback":
            callback["init_args"].update(n=100, num_examples=12)
    Path("digits.yaml").write_text(yaml.safe_dump(config))
    args = ["--config", "digits.yaml", "--trainer.max_epochs", "2", *SHORT]
    args += ["--trainer.limit_test_batches", "2", "--trainer.log_every_n_steps", "1"]
    try:
        cli = lightning_cli("fit", *args)
        logger = cli.trainer.logger
        config = dict(logger.experiment.config)  # the run config holds the resolved config
        logged = set(logger.experiment.summary.keys())
        run_dir = Path("runs") / "topk-smoothing-digits" / logger.version
    finally:
        wandb.finish()  # flush the offline run file, as the end of a process does
    assert config["model"]["init_args"]["sigma"] == 0.25
    assert config["model"]["init_args"]["num_classes"] == 10  # linked from the data
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["data"]["class_path"] == "datamodules.DigitsDataModule"
    assert config["trainer"]["max_epochs"] == 2
    assert config["num_noise_samples"] == 1  # the module's hyperparameters, resolved
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # reusable: no link targets
    assert saved["model"]["init_args"]["sigma"] == 0.25 and "num_classes" not in saved["model"]
    assert saved["model"]["init_args"]["arch"] == "digits_cnn"
    assert saved["trainer"]["max_epochs"] == 2 and saved["trainer"]["limit_train_batches"] == 3
    assert {p.name for p in Path(".").iterdir()} <= {"digits.yaml", "runs", "torch-home"} | {
        p.name for p in Path(".").glob(".wandb-*")
    }  # everything the run wrote is under runs/
    assert {"train/loss", "val/loss", "val/acc_top1", "val/acc_top3", "test/acc_top1"} <= logged

    (run_file,) = Path("runs", "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(run_file)
    accuracy = [row["val/acc_top1"] for row in rows if "val/acc_top1" in row]
    assert len(accuracy) == 2  # one validation per epoch
    val = [row for row in rows if "val/acc_top3" in row][-1]
    (test,) = [row for row in rows if "test/acc_top1" in row]
    (certified,) = [row for row in rows if "val/certified_top1@0" in row]  # the last epoch's
    assert any("train/loss" in row for row in rows)
    assert 0 <= val["val/acc_top1"] <= val["val/acc_top3"] <= 1
    assert 0 <= test["test/acc_top1"] <= test["test/acc_top3"] <= 1
    assert 0 <= certified["val/certified_top1@0.5"] <= certified["val/certified_top1@0"] <= 1
    best = accuracy.index(max(accuracy))  # ModelCheckpoint keeps the first of equal scores
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"best-epoch{best:03d}.ckpt", "last.ckpt"]
    last = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)  # tensors, numbers and strings only
    assert state["epoch"] == 1 and state["global_step"] == 6  # limit_train_batches: 3 steps
    scores = [v["best_model_score"] for k, v in state["callbacks"].items() if "val/acc_top1" in k]
    assert [float(s) for s in scores] == [pytest.approx(max(accuracy))]

    reloaded = NoisyClassifier.load_from_checkpoint(last)
    assert reloaded.sigma == 0.25 and reloaded.num_classes == 10
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(reloaded.eval()(x), cli.model.eval()(x))
    test_args = ["--ckpt_path", str(last), "--trainer.logger", "false"]
    test_args += ["--trainer.limit_test_batches", "2"]
    assert main(["test", "--config", str(run_dir / "config.yaml"), *test_args]) == 0

    args[args.index("--trainer.max_epochs") + 1] = "3"
    try:
        cli = lightning_cli("fit", *args, "--ckpt_path", str(last))
        assert cli.trainer.logger.version == run_dir.name
    finally:
        wandb.finish()
    assert list(Path("runs", "topk-smoothing-digits").iterdir()) == [run_dir]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # still a new run's config
    logger_args = saved["trainer"]["logger"]["init_args"]
    assert logger_args.get("id") is None and logger_args.get("resume") is None
    run_files = sorted(Path("runs", "wandb").glob(f"offline-run-*-{run_dir.name}/run-*.wandb"))
    assert len(run_files) == 2
    accuracy += [row["val/acc_top1"] for row in history(run_files[1]) if "val/acc_top1" in row]
    assert len(accuracy) == 3
    best = accuracy.index(max(accuracy))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"best-epoch{best:03d}.ckpt", "last.ckpt"]


def fit(folder: Path, epochs: int, ckpt_path: Path | None = None) -> dict:
    """A short digits fit (3 batches per epoch); its final checkpoint."""
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = NoisyClassifier("digits_cnn", 10, data.mean, data.std, top_k=(1, 3))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=3,
        limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=folder,
    )  # fmt: skip
    trainer.fit(model, data, ckpt_path=ckpt_path)
    (path,) = (folder / "checkpoints").glob(f"epoch={epochs - 1}-*.ckpt")
    return torch.load(path, weights_only=True)


def test_resume_from_checkpoint_is_exact(tmp_path):
    """Two epochs in one go equal one epoch, then a resumed second one (noise, data order and
    dropout included)."""
    straight = fit(tmp_path / "a", 2)
    halfway = fit(tmp_path / "b", 1)
    (first,) = (tmp_path / "b" / "checkpoints").glob("*.ckpt")
    resumed = fit(tmp_path / "b", 2, ckpt_path=first.rename(first.with_name("first.ckpt")))
    assert straight["epoch"] == resumed["epoch"] == 1 and halfway["epoch"] == 0
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    weight = "net.1.fc.weight"
    assert not torch.equal(halfway["state_dict"][weight], straight["state_dict"][weight])


def run_fit(capsys, config: str, *args: str) -> str:
    """``fit`` with a mistake: exit status 2, one line on stderr, nothing else written."""
    assert main(["fit", "--config", str(CONFIGS / config), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("topk-smoothing fit: error: ")
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not Path("runs").exists()
    return captured.err


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("digits.yaml", ["--model.arch", "resnet5"], "unknown model 'resnet5'; choose one of: c"),
        (
            "digits.yaml",
            ["--model.arch", "resnet50", "--model.weights", "IMAGENET9"],
            "'IMAGENET9' is neither a file nor a weights name of resnet50 (choose one of: DEFAULT",
        ),
        ("digits.yaml", ["--model.weights", "no/w.pth"], "weights file 'no/w.pth' does not exist"),
        ("digits.yaml", ["--ckpt_path", "missing.ckpt"], "missing.ckpt"),
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
            "cifar10_resnet110.yaml",
            ["--data.data_dir", "no/such/dir"],
            "data_dir 'no/such/dir' is not a directory",
        ),
        (
            "imagenet_resnet50.yaml",
            ["--data.data_dir", "no/such/dir"],
            "data_dir 'no/such/dir' is not a directory",
        ),
    ],
)
def test_bad_settings_fail_at_start_up_in_one_line(isolated_run, capsys, config, args, message):
    assert message in run_fit(capsys, config, *args)


@pytest.mark.parametrize(
    ("config", "option", "value"),
    [
        ("digits.yaml", "model.sigma", "0"),
        ("digits.yaml", "model.sigma", "-0.5"),
        ("digits.yaml", "model.sigma", "abc"),
        ("digits.yaml", "trainer.max_epochs", "many"),
        ("digits.yaml", "data.batch_size", "0"),
        ("digits.yaml", "model.loss", "hinge"),
        ("digits_consistency.yaml", "model.consistency_lambda", "-1"),
        ("digits_smoothadv.yaml", "model.smoothadv_steps", "0"),
    ],
)
def test_bad_values_fail_at_start_up_in_one_line(isolated_run, capsys, config, option, value):
    """Found by the command-line parser (whose wording is its own): the line names the
    option and the value."""
    err = run_fit(capsys, config, f"--{option}", value)
    assert_names(err, option.split(".")[-1], value)


def test_console_error_is_the_only_output(isolated_run):
    """The real console path: exit status 2, one line on stderr, no traceback, nothing written."""
    command = [sys.executable, "-m", "certify", "fit", "--config", DIGITS, "--model.arch", "x"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "topk-smoothing fit: error: unknown model 'x'; choose one of: cifar_resnet110, "
        "cifar_resnet20, digits_cnn, resnet101, resnet18, resnet50"
    ]
    assert done.stdout == "" and not Path("runs").exists()


@pytest.mark.parametrize(("sigma", "lam"), [("0.25", 10.0), ("0.5", 5.0)])
def test_consistency_lambda_defaults_to_the_paper_value_for_the_data(isolated_run, lightning_cli,
                                                                     sigma, lam):  # fmt: skip
    """The digits datamodule names its kind (MNIST) and the model takes Jeong & Shin's MNIST
    lambda from it, not their CIFAR-10 one (20 below sigma = 0.5, else 10)."""
    args = ["--config", CONFIGS / "digits_consistency.yaml", "--model.sigma", sigma]
    cli = lightning_cli(*args, run=False)
    assert cli.model.hparams["data_kind"] == "mnist"
    assert cli.model.hparams["consistency_lambda"] == lam
