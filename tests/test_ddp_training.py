"""Two-process DDP training on the CPU (gloo): every process adds its own noise, and a resumed
run equals an uninterrupted one for every loss (``tests/ddp_fits.py``, one launch); the console
command runs a DDP fit to completion with its logger, checkpoints and test, and validates and
tests as one process does."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.console import DIGITS, QUIET, console
from tests.ddp_fits import LOSSES
from tests.wandb_records import history

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def launch(command: list[str], env: dict | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="module")
def ddp_fits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp_fits")
    launch([sys.executable, str(REPO / "tests" / "ddp_fits.py"), str(out)])
    return out


def printed(output: str) -> dict[str, float]:
    """The base classifier's metrics in Lightning's validate or test table in ``output``."""
    rows = re.findall(r"((?:val|test)/(?:loss|acc_top\d+))[\s│|]+([-+.e\d]+)\s", output)
    return {key: float(value) for key, value in rows}


def recorded(folder: Path, rank: int, epoch: int) -> list[torch.Tensor]:
    return torch.load(folder / f"noise-rank{rank}-epoch{epoch}.pt")


def checkpoint(folder: Path, name: str = "epoch=1-step=4.ckpt") -> dict:
    return torch.load(folder / "checkpoints" / name, weights_only=True)  # tensors and numbers


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_process_adds_its_own_noise_and_resumes_exactly(ddp_fits, loss):
    """Rank 0 and rank 1 add different noise; a rerun adds the same noise; a run resumed from
    its first epoch's checkpoint adds the same noise (SmoothAdv: at the same warmed-up epsilon)
    and ends with the same weights as an uninterrupted run."""
    straight, halves = ddp_fits / loss / "straight", ddp_fits / loss / "halves"
    for epoch in (0, 1):
        rank0, rank1 = recorded(straight, 0, epoch), recorded(straight, 1, epoch)
        assert len(rank0) == len(rank1) == 2  # two training batches per epoch
        for a, b in zip(rank0, rank1, strict=True):
            assert a.shape == b.shape and not torch.equal(a, b)
            assert 0.2 < float(a.std()) < 0.3  # sigma = 0.25
        for rank in (0, 1):  # the same run again (epoch 0), and its resumed half (epoch 1)
            again, first = recorded(halves, rank, epoch), recorded(straight, rank, epoch)
            assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    end, resumed = checkpoint(straight), checkpoint(halves)
    halfway = checkpoint(halves, "epoch=0-step=2.ckpt")
    assert end["epoch"] == resumed["epoch"] == 1 and halfway["epoch"] == 0
    assert end["global_step"] == resumed["global_step"] == 4  # 2 batches per epoch
    assert end["hyper_parameters"]["loss"] == resumed["hyper_parameters"]["loss"] == loss
    assert len(end["rng_states"]) == 2  # every process's random states
    assert end["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in end["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert not torch.equal(
        halfway["state_dict"]["net.1.fc.weight"], end["state_dict"]["net.1.fc.weight"]
    )


@pytest.mark.slow
@pytest.mark.ddp
def test_two_process_cpu_ddp_fit_runs_to_completion_and_evaluates_as_one_process(isolated_run):
    """``topk-smoothing fit`` as users run it with ``configs/ddp.yaml`` on the CPU: the launcher
    re-runs the console command; rank 0 alone writes the run's folder and W&B run. Its last
    validation and its test of the best checkpoint (whole splits, 359 and 360 examples) log
    what ``validate`` and ``test`` of those checkpoints log in one process: no example counted
    twice, each example's noise its own, whatever the process."""
    certification = ["--trainer.callbacks.init_args.n", "100",  # the last callback
                     "--trainer.callbacks.init_args.num_examples", "10"]  # fmt: skip
    output = launch([
        sys.executable, "-m", "certify", "fit", "--config", DIGITS,
        "--config", str(CONFIGS / "ddp.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.max_epochs", "2",
        "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        *certification,
    ])  # fmt: skip
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in output
    assert "test/acc_top1" in output  # test_after_fit ran on both processes
    (run,) = Path("runs", "topk-smoothing-digits").iterdir()  # one run, written by rank 0
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 4
    (run_file,) = Path("runs", "wandb").glob("offline-run-*/run-*.wandb")
    two = [row for row in history(run_file) if "val/acc_top1" in row][-1] | printed(output)
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    one = {}
    for command, path in (("validate", run / "checkpoints" / "last.ckpt"), ("test", best)):
        code, out, err = console(command, "--config", DIGITS, "--ckpt_path", path, *QUIET,
                                 *certification)  # fmt: skip
        assert code == 0, err[-3000:]
        one |= printed(out)
    assert {key for key in one if "/acc_top" in key} == {
        f"{stage}/acc_top{k}" for stage in ("val", "test") for k in (1, 3)
    }
    for key in one:  # accuracies exactly; the loss, a mean over the examples, to rounding
        assert two[key] == (one[key] if "/acc_top" in key else pytest.approx(one[key])), key
