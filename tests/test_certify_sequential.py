"""`topk-smoothing certify --sequential --radii ...`: the files, agreement with the API, resume,
the report, and refused settings."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from certify import SmoothedClassifier
from certify.commands.checkpoints import load_network_weights
from datamodules import DigitsDataModule
from lightning_modules.cli import main
from lightning_modules.models import build_network
from tests.console import interrupted_copy, read_rows, run_command

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
N_MAX, EXAMPLES, TARGETS = 4000, 16, (0.25, 0.5, 0.75)
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def certify(cwd: Path, ckpt: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return run_command(
        cwd, "certify", "--config", DIGITS, "--ckpt_path", ckpt,
        "--n", N_MAX, "--alpha", "0.01", "--k", "1", "3", "--skip", "2",
        "--max_examples", EXAMPLES, "--seed", "7", "--output_dir", out,
        "--sequential", "--radii", *TARGETS, *QUIET, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sequential_run(digits_checkpoint, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sequential")
    result = certify(cwd, digits_checkpoint, "seq")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "seq", result.stdout


def test_files_and_settings(sequential_run):
    out, stdout = sequential_run
    table = read_rows(out / "certify.tsv")
    assert table[0] == ["idx", "label", "pred1", "pred2", "pred3"] + [
        "radius_top1", "radius_top3", "samples"
    ]  # fmt: skip
    assert [int(r[0]) for r in table[1:]] == list(range(0, 2 * EXAMPLES, 2))
    radii = np.array([[float(v) for v in r[5:7]] for r in table[1:]])  # (N, 2)
    samples = np.array([int(r[7]) for r in table[1:]])
    assert np.isin(radii[~np.isnan(radii)], TARGETS).all()
    assert (samples <= N_MAX).all() and (samples < N_MAX).any() and (samples > 0).all()
    meta = json.loads((out / "certify.json").read_text())
    assert (meta["mode"], meta["n_max"], meta["radii"]) == ("sequential", N_MAX, list(TARGETS))
    assert "n" not in meta
    assert not (out / "counts.txt").exists()  # stopped counts are no count file
    report = (out / "report.md").read_text()
    assert f"sequential, n_max: {N_MAX}, mean samples: {samples.mean():.0f}" in report
    assert "| k | r = 0.25 | r = 0.5 | r = 0.75 | ACR |" in report
    assert f"at most n = {N_MAX} samples per example, radii {TARGETS}" in stdout


def test_the_command_certifies_what_the_api_certifies(sequential_run, digits_checkpoint):
    """The same radii and samples as ``SmoothedClassifier.certify_sequential`` on the same
    examples, seed and example ids (the dataset indices), in one call."""
    out, _ = sequential_run
    data = DigitsDataModule()
    data.setup("test")
    net = build_network("digits_cnn", 10, data.mean, data.std)
    load_network_weights(net, digits_checkpoint, "digits_cnn")
    indices = list(range(0, 2 * EXAMPLES, 2))
    x = torch.stack([data.test_dataset[i][0] for i in indices])  # (N, 1, 8, 8)
    labels = torch.tensor([int(data.test_dataset[i][1]) for i in indices])
    smoothed = SmoothedClassifier(net.eval(), 10, 0.25)
    cert = smoothed.certify_sequential(
        x, labels, (1, 3), TARGETS, N_MAX, 0.01, seed=7, example_ids=indices
    )
    table = read_rows(out / "certify.tsv")[1:]
    written = np.array([[float(v) for v in r[5:7]] for r in table])
    np.testing.assert_array_equal(written, cert.radius.numpy())
    assert [int(r[7]) for r in table] == cert.samples.tolist()
    assert np.isfinite(written[:, 1]).mean() > 0.8  # the trained model certifies most of them


def test_resume_completes_an_interrupted_run(sequential_run, digits_checkpoint):
    out, _ = sequential_run
    partial = out.parent / "partial"
    interrupted_copy(out, partial, "certify.json", rows=5, cut=9)
    result = certify(out.parent, digits_checkpoint, "partial")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rows(partial / "certify.tsv") == read_rows(out / "certify.tsv")


def test_a_fixed_n_directory_is_not_mixed_with_a_sequential_run(sequential_run, digits_checkpoint):
    out, _ = sequential_run
    result = certify(out.parent, digits_checkpoint, "seq", "--radii", "0.5")
    assert result.returncode == 2
    assert "holds a run with radii = [0.25, 0.5, 0.75]" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--radii", "0.25", "0.5"], "--radii sets the targets of --sequential true"),
        (["--sequential", "--bounds", "binocp"], "bounds with simuem"),
        (["--sequential", "--radii", "0.25", "-1"], "radii must be finite numbers >= 0, got -1.0"),
        (["--sequential", "true", "--radii", "0.5", "0.5"], "radii must be distinct"),
    ],
)
def test_impossible_sequential_settings(isolated_run, capsys, digits_checkpoint, args, message):
    argv = ["certify", "--config", DIGITS, "--ckpt_path", str(digits_checkpoint), *QUIET]
    assert main([*argv, "--n", "100", "--output_dir", "out", *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("topk-smoothing certify: error: ")
    assert message in lines[0]
    assert not Path("out").exists()
