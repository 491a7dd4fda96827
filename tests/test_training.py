"""``topk-smoothing fit`` on digits: W&B offline, checkpoints, exact resume, start-up errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules import NoisyClassifier
from lightning_modules.cli import main
from tests.messages import assert_names
from tests.wandb_records import history

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DIGITS = str(CONFIGS / "digits.yaml")
SHORT = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2"]


def test_fit_writes_checkpoints_config_and_metrics(isolated_run):
    """`topk-smoothing fit` as the console runs it: one short epoch, then the test of the best
    checkpoint. The run's folder holds both checkpoints and its config.yaml; the offline W&B run
    holds the training, validation, certification and test metrics."""
    import wandb

    config = yaml.safe_load(Path(DIGITS).read_text())
    for callback in config["trainer"]["callbacks"]:  # a cheaper certification, same callback
        if callback["class_path"] == "certify.CertificationCallback":
            callback["init_args"].update(n=100, num_examples=12)
    Path("digits.yaml").write_text(yaml.safe_dump(config))
    args = ["--trainer.max_epochs", "1", "--trainer.limit_test_batches", "2", *SHORT]
    args += ["--trainer.log_every_n_steps", "1"]
    try:
        assert main(["fit", "--config", "digits.yaml", *args]) == 0
    finally:
        wandb.finish()  # flush the offline run file, as the end of a process does
    (run_dir,) = Path("runs", "topk-smoothing-digits").iterdir()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and last["global_step"] == 3  # limit_train_batches: 3 steps
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config
    assert saved["trainer"]["max_epochs"] == 1
    assert saved["trainer"]["limit_train_batches"] == 3
    assert saved["model"]["init_args"]["arch"] == "digits_cnn"
    assert {p.name for p in Path(".").iterdir()} <= {"digits.yaml", "runs", "torch-home"} | {
        p.name for p in Path(".").glob(".wandb-*")
    }  # everything the run wrote is under runs/

    (run_file,) = Path("runs", "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(run_file)
    (val,) = [row for row in rows if "val/acc_top1" in row]
    (test,) = [row for row in rows if "test/acc_top1" in row]
    (certified,) = [row for row in rows if "val/certified_top1@0" in row]  # the last epoch's
    assert any("train/loss" in row for row in rows)
    assert 0 <= val["val/acc_top1"] <= val["val/acc_top3"] <= 1
    assert 0 <= test["test/acc_top1"] <= test["test/acc_top3"] <= 1
    assert 0 <= certified["val/certified_top1@0.5"] <= certified["val/certified_top1@0"] <= 1
    states = last["callbacks"]  # the ModelCheckpoint on val/acc_top1 kept the epoch's score
    scores = [v["best_model_score"] for k, v in states.items() if "val/acc_top1" in k]
    assert [float(s) for s in scores] == [pytest.approx(val["val/acc_top1"])]


def test_fit_logs_offline_to_wandb_and_keeps_everything_under_runs(isolated_run, lightning_cli):
    import wandb

    args = ["--trainer.max_epochs", "2", "--trainer.limit_test_batches", "2", *SHORT]
    try:
        cli = lightning_cli("fit", "--config", DIGITS, *args)
        logger = cli.trainer.logger
        config = dict(logger.experiment.config)  # the run config holds the resolved config
        logged = set(logger.experiment.summary.keys())
        run_dir = Path("runs") / "topk-smoothing-digits" / logger.version
    finally:
        wandb.finish()
    assert config["model"]["init_args"]["sigma"] == 0.25
    assert config["model"]["init_args"]["num_classes"] == 10  # linked from the data
    assert config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["data"]["class_path"] == "datamodules.DigitsDataModule"
    assert config["trainer"]["max_epochs"] == 2
    assert config["num_noise_samples"] == 1  # the module's hyperparameters, resolved
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())  # reusable: no link targets
    assert saved["model"]["init_args"]["sigma"] == 0.25 and "num_classes" not in saved["model"]
    (run_file,) = Path("runs", "wandb").glob("offline-run-*/run-*.wandb")
    accuracy = [row["val/acc_top1"] for row in history(run_file) if "val/acc_top1" in row]
    assert len(accuracy) == 2  # one validation per epoch
    best = accuracy.index(max(accuracy))  # ModelCheckpoint keeps the first of equal scores
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"best-epoch{best:03d}.ckpt", "last.ckpt"]
    assert {p.name for p in Path(".").iterdir()} <= {"runs", "torch-home"} | {
        p.name for p in Path(".").glob(".wandb-*")
    }
    assert {"train/loss", "val/loss", "val/acc_top1", "val/acc_top3", "test/acc_top1"} <= logged

    last = run_dir / "checkpoints" / "last.ckpt"
    reloaded = NoisyClassifier.load_from_checkpoint(last)
    assert reloaded.sigma == 0.25 and reloaded.num_classes == 10
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(reloaded.eval()(x), cli.model.eval()(x))
    test_args = ["--ckpt_path", str(last), "--trainer.logger", "false"]
    test_args += ["--trainer.limit_test_batches", "1"]
    assert main(["test", "--config", str(run_dir / "config.yaml"), *test_args]) == 0

    # Resuming continues the run: its folder, its W&B id, and the best epoch over all epochs.
    args[1] = "3"  # --trainer.max_epochs
    try:
        cli = lightning_cli("fit", "--config", DIGITS, *args, "--ckpt_path", str(last))
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


def final_state(folder: str) -> dict:
    checkpoint = torch.load(Path(folder, "checkpoints", "last.ckpt"), weights_only=False)
    return {"epoch": checkpoint["epoch"], **checkpoint["state_dict"]}


def test_resume_from_checkpoint_is_exact(isolated_run, lightning_cli):
    """Two epochs in one go equal one epoch, then a resumed second one (noise included)."""
    common = ["--config", DIGITS, "--trainer.logger", "false", "--test_after_fit", "false", *SHORT]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]

    def fit(epochs: int, folder: str, *more: str) -> None:
        root = ["--trainer.default_root_dir", folder]
        lightning_cli("fit", *common, "--trainer.max_epochs", str(epochs), *root, *more)

    fit(2, "a")
    fit(1, "b")
    halfway = final_state("b")
    fit(2, "b", "--ckpt_path", "b/checkpoints/last.ckpt")
    straight, resumed = final_state("a"), final_state("b")
    assert straight["epoch"] == resumed["epoch"] == 1 and halfway["epoch"] == 0
    assert straight.keys() == resumed.keys()
    for key in straight:
        if key != "epoch":
            assert torch.equal(straight[key], resumed[key]), key
    assert not torch.equal(halfway["net.1.fc.weight"], straight["net.1.fc.weight"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.sigma", "0"], "sigma must be a finite number > 0, got 0.0"),
        (["--model.sigma", "-0.5"], "sigma must be a finite number > 0, got -0.5"),
        (["--model.arch", "resnet5"], "unknown model 'resnet5'; choose one of: cifar_resnet110, "),
        (
            ["--model.arch", "resnet50", "--model.weights", "IMAGENET9"],
            "'IMAGENET9' is neither a file nor a weights name of resnet50 (choose one of: DEFAULT",
        ),
        (["--model.weights", "nowhere/w.pth"], "weights file 'nowhere/w.pth' does not exist"),
        (["--ckpt_path", "missing.ckpt"], "checkpoint 'missing.ckpt' does not exist"),
        (["--data.batch_size", "0"], "batch_size must be >= 1, got 0"),
    ],
)
def test_bad_settings_fail_at_start_up_in_one_line(isolated_run, capsys, args, message):
    assert main(["fit", "--config", DIGITS, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topk-smoothing fit: error: ") and err.count("\n") == 1
    assert message in err


@pytest.mark.parametrize(
    ("option", "name", "value"),
    [("model.sigma", "sigma", "abc"), ("trainer.max_epochs", "trainer.max_epochs", "many")],
)
def test_values_of_the_wrong_type_fail_at_start_up(isolated_run, capsys, option, name, value):
    """Found by the command-line parser (whose wording is its own): exit status 2, one line
    naming the option and the value, nothing written."""
    assert main(["fit", "--config", DIGITS, f"--{option}", value]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("topk-smoothing fit: error: ")
    assert captured.err.count("\n") == 1
    assert_names(captured.err, name, value)
    assert captured.out == "" and not Path("runs").exists()


@pytest.mark.parametrize("config", ["cifar10_resnet110.yaml", "imagenet_resnet50.yaml"])
def test_missing_data_directory_fails_at_start_up(isolated_run, capsys, config):
    args = ["--config", str(CONFIGS / config), "--data.data_dir", "no/such/dir"]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_dir 'no/such/dir' is not a directory" in err


def test_console_error_is_the_only_output(isolated_run):
    """The real console path: exit status 2, one line on stderr, no traceback, nothing written."""
    command = [sys.executable, "-m", "certify", "fit", "--config", DIGITS, "--model.sigma", "-1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "topk-smoothing fit: error: sigma must be a finite number > 0, got -1.0"
    ]
    assert done.stdout == "" and not Path("runs").exists()
