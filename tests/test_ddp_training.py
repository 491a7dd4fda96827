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
