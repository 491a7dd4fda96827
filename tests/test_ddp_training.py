"""Two-process DDP training on the CPU (gloo), through the console command as users run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_cpu_ddp_fit_runs_to_completion(isolated_run):
    command = [
        sys.executable, "-m", "certify", "fit",
        "--config", str(CONFIGS / "digits.yaml"), "--config", str(CONFIGS / "ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        "--trainer.limit_test_batches", "2", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(CONFIGS.parent)}  # the launcher re-runs `-m certify`
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in output
    assert "test/acc_top1" in output  # test_after_fit ran on both processes
    (run,) = Path("runs", "topk-smoothing-digits").iterdir()  # one run, written by rank 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 8
    assert len(list(Path("runs", "wandb").glob("offline-run-*"))) == 1


def ddp_fit(folder: str, epochs: int, *more: str) -> None:
    """A 2-process CPU fit of the digits config with the noise recorded, 2 batches per epoch."""
    command = [
        sys.executable, "-m", "certify", "fit",
        "--config", str(CONFIGS / "digits.yaml"), "--config", str(CONFIGS / "ddp.yaml"),
        "--model", "noise_recorder.RecordingClassifier",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.default_root_dir", folder, "--test_after_fit", "false", *more,
    ]  # fmt: skip
    path = os.pathsep.join([str(CONFIGS.parent), str(CONFIGS.parent / "tests")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def recorded(folder: str, rank: int, epoch: int) -> list[torch.Tensor]:
    return torch.load(Path(folder, f"noise-rank{rank}-epoch{epoch}.pt"))


@pytest.mark.slow
@pytest.mark.ddp
def test_every_process_adds_its_own_noise_and_resumes_exactly(isolated_run):
    """Rank 0 and rank 1 add different noise; a rerun adds the same noise; a run resumed from
    its first epoch's checkpoint adds the same noise and ends with the same weights as an
    uninterrupted run."""
    ddp_fit("straight", 2)
    ddp_fit("resumed", 1)
    ddp_fit("resumed", 2, "--ckpt_path", "resumed/checkpoints/last.ckpt")
    for epoch in (0, 1):
        rank0, rank1 = recorded("straight", 0, epoch), recorded("straight", 1, epoch)
        assert len(rank0) == len(rank1) == 2  # two training batches per epoch
        for a, b in zip(rank0, rank1, strict=True):
            assert a.shape == b.shape and not torch.equal(a, b)
            assert 0.2 < float(a.std()) < 0.3  # sigma = 0.25
        for rank in (0, 1):  # the same run again (epoch 0), and its resumed half (epoch 1)
            again, first = recorded("resumed", rank, epoch), recorded("straight", rank, epoch)
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    straight = torch.load(Path("straight", "checkpoints", "last.ckpt"), weights_only=True)
    resumed = torch.load(Path("resumed", "checkpoints", "last.ckpt"), weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 4
    assert len(straight["rng_states"]) == 2  # every process's random states
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
