"""The one line `certify` and `predict` print before sampling: what the certificate is about."""

from pathlib import Path

import torch

from certify.commands.cli import main
from lightning_modules.models import build_network

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def startup(out: str, command: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(f"{command}: checkpoint ")]
    assert len(lines) == 1, out
    return lines[0]


def test_certify_names_a_sigma_other_than_the_training_sigma(
    isolated_run, capsys, digits_checkpoint
):
    args = ["certify", "--config", DIGITS, "--ckpt_path", str(digits_checkpoint), *QUIET]
    assert main([*args, "--n", "10", "--max_examples", "1", "--sigma", "0.5"]) == 0
    line = startup(capsys.readouterr().out, "certify")
    checkpoint, rest = line.split(" (Lightning, sha256 ", 1)
    assert checkpoint == f"certify: checkpoint {digits_checkpoint}"
    assert rest[12:] == (
        "); arch digits_cnn; sigma 0.5 (NOT the training sigma 0.25); normalisation mean "
        "(0.3053) std (0.376); n 10, alpha 0.001, k 1 3 5, bounds simuem, split test, "
        "examples 1; device cpu; batch_size automatic, seed 0, channels_last false, autocast none, "
        "compile false"
    )


def test_a_checkpoint_without_its_sigma_says_so(isolated_run, capsys):
    """Cohen et al.'s files do not record the noise level they were trained at."""
    net = build_network("digits_cnn", 10, (0.5,), (0.25,), None)
    torch.save({"epoch": 90, "arch": "digits_cnn", "state_dict": net.state_dict()}, "cohen.pth")
    args = ["predict", "--config", DIGITS, "--ckpt_path", "cohen.pth", *QUIET]
    assert main([*args, "--n0", "5", "--n", "10", "--max_examples", "1", "--k", "2"]) == 0
    line = startup(capsys.readouterr().out, "predict")
    assert "(Cohen et al.'s format, sha256 " in line
    assert "sigma 0.25 (the weights do not record a training sigma)" in line
    assert "n0 5, n 10, alpha 0.001, k 2, inputs test split, examples 1" in line
