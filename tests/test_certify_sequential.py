"""`topk-smoothing certify --sequential true --radii [...]`: the files, agreement with the API,
resume, the report, and refused settings."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from certify import SmoothedClassifier
from certify.commands.checkpoints import load_network_weights
from certify.math.sequential import DEFAULT_BUDGET, DEFAULT_FUTILITY
from certify.math.validation import UsageError
from datamodules import DigitsDataModule
from lightning_modules.models import build_network
from tests.console import (
    DIGITS,
    QUIET,
    assert_one_line_error,
    console,
    interrupted_copy,
    read_rows,
    trainer_and_model,
)

N_MAX, EXAMPLES, TARGETS = 4000, 8, (0.25, 0.5, 0.75)
SEQUENTIAL = ("--sequential", "true", "--radii", "[0.25,0.5,0.75]")


def certify_args(ckpt: Path, out: Path, *extra, mode=SEQUENTIAL) -> list:
    return [
        "certify", "--config", DIGITS, "--ckpt_path", ckpt, "--n", N_MAX, "--alpha", "0.01",
        "--k", "[1,3]", "--skip", "2", "--max_examples", EXAMPLES, "--seed", "7",
        "--output_dir", out, *mode, *QUIET, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def sequential_run(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "seq"
    code, stdout, err = console(*certify_args(digits_checkpoint, out))
    assert code == 0, err[-3000:]
    return out, stdout


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
    assert (meta["futility"], meta["budget"]) == (DEFAULT_FUTILITY, DEFAULT_BUDGET)
    assert "n" not in meta
    assert not (out / "counts.txt").exists()  # stopped counts are no count file
    report = (out / "report.md").read_text()
    assert f"sequential, n_max: {N_MAX}, mean samples: {samples.mean():.0f}" in report
    assert "| k | r = 0.25 | r = 0.5 | r = 0.75 | ACR |" in report
    radii = " ".join(f"{r:g}" for r in TARGETS)
    assert f"at most n = {N_MAX} samples per example, target radii {radii}" in stdout


def test_the_command_certifies_what_the_api_certifies(sequential_run, digits_checkpoint):
    """The same radii and samples as ``SmoothedClassifier.certify_sequential`` on the same
    examples, seed and example ids (the dataset indices); an example's result depends on its
    own noise stream only, so a few of them in one call suffice."""
    out, _ = sequential_run
    data = DigitsDataModule()
    data.setup("test")
    net = build_network("digits_cnn", 10, data.mean, data.std)
    load_network_weights(net, digits_checkpoint, "digits_cnn")
    rows = [0, 3, 5]  # rows of the table: dataset indices 0, 6, 10
    indices = [2 * r for r in rows]
    x = torch.stack([data.test_dataset[i][0] for i in indices])  # (3, 1, 8, 8)
    labels = torch.tensor([int(data.test_dataset[i][1]) for i in indices])
    smoothed = SmoothedClassifier(net.eval(), 10, 0.25)
    cert = smoothed.certify_sequential(
        x, labels, (1, 3), TARGETS, N_MAX, 0.01, seed=7, example_ids=indices
    )
    table = [read_rows(out / "certify.tsv")[1:][r] for r in rows]
    written = np.array([[float(v) for v in r[5:7]] for r in table])
    np.testing.assert_array_equal(written, cert.radius.numpy())
    assert [int(r[7]) for r in table] == cert.samples.tolist()
    all_rows = read_rows(out / "certify.tsv")[1:]
    assert np.isfinite([float(r[6]) for r in all_rows]).mean() > 0.7  # most are certified


def test_resume_completes_an_interrupted_run(sequential_run, digits_checkpoint):
    out, _ = sequential_run
    partial = out.parent / "partial"
    interrupted_copy(out, partial, "certify.json", rows=5, cut=9)
    code, _, err = console(*certify_args(digits_checkpoint, partial))
    assert code == 0, err[-3000:]
    assert read_rows(partial / "certify.tsv") == read_rows(out / "certify.tsv")


def test_a_fixed_n_or_other_targets_are_not_mixed_with_a_sequential_run(
    sequential_run, digits_checkpoint
):
    out, _ = sequential_run
    other_targets = console(*certify_args(digits_checkpoint, out, "--radii", "[0.5]"))
    assert_one_line_error(other_targets, "certify", "holds a run with radii = [0.25, 0.5, 0.75]")
    fixed_n = console(*certify_args(digits_checkpoint, out, mode=()))
    assert_one_line_error(fixed_n, "certify", "holds a run with ", "refusing to mix")


def test_impossible_sequential_settings(isolated_run, digits_checkpoint):
    """Refused before anything is written: in one line at the console, and by ``certify``
    itself (the one check of each value, whoever calls it)."""
    base = ["certify", "--config", DIGITS, "--ckpt_path", digits_checkpoint, *QUIET]
    result = console(*base, "--n", "100", "--output_dir", "out", "--radii", "[0.25,0.5]")
    assert_one_line_error(result, "certify", "--radii sets the targets of --sequential true")
    result = console(*base, "--output_dir", "out", "--sequential", "true", "--radii", "[0.25,-1]")
    assert_one_line_error(result, "certify", "radii", "-1")  # by the option's type
    trainer, model = trainer_and_model(digits_checkpoint)
    for settings, message in [
        (dict(sequential=True, bounds="binocp"), "bounds with simuem .* got bounds 'binocp'"),
        (dict(sequential=True, radii=[0.5, math.inf]), "radii must be finite .* got inf"),
        (dict(sequential=True, radii=[0.5, 0.5]), r"radii must be distinct, got \[0.5, 0.5\]"),
    ]:
        with pytest.raises(UsageError, match=message):
            trainer.certify(model, DigitsDataModule(), digits_checkpoint, n=100, **settings)
    assert list(isolated_run.iterdir()) == []
