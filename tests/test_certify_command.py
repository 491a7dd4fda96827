"""`topk-smoothing certify`: files, consistency with `radius`, 2 processes, resume, refusal."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from certify.commands.checkpoints import CheckpointError, load_network_weights
from certify.commands.countfile import read_counts
from certify.math.radius import certified_radius
from lightning_modules.models import build_network
from tests.console import interrupted_copy, read_rows, run_command

REPO = Path(__file__).resolve().parents[1]
N, EXAMPLES = 300, 24


def certify(cwd: Path, ckpt: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return run_command(
        cwd, "certify", "--config", REPO / "configs" / "digits.yaml",
        "--ckpt_path", ckpt, "--n", N, "--alpha", "0.01", "--k", "1", "3",
        "--skip", "3", "--max_examples", EXAMPLES, "--seed", "7", "--output_dir", out,
        "--trainer.enable_progress_bar", "false", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single_run(digits_checkpoint, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("certify")
    result = certify(cwd, digits_checkpoint, "single")
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "single"


def test_output_files(single_run):
    rows = read_rows(single_run / "certify.tsv")
    assert rows[0] == ["idx", "label", "pred1", "pred2", "pred3", "radius_top1", "radius_top3"]
    assert [int(r[0]) for r in rows[1:]] == list(range(0, 3 * EXAMPLES, 3))
    for name in ("counts.txt", "report.md", "report.csv", "certified_accuracy.png", "certify.json"):
        assert (single_run / name).is_file(), name
    assert "examples: 24, n: 300" in (single_run / "report.md").read_text()


def test_counts_file_reproduces_the_radii(single_run):
    """counts.txt feeds `radius`: same radii without sampling again; rows sum to n."""
    counts, labels = read_counts(single_run / "counts.txt")
    assert (counts.sum(axis=1) == N).all()
    rows = read_rows(single_run / "certify.tsv")[1:]
    np.testing.assert_array_equal(labels, [int(r[1]) for r in rows])
    radii = certified_radius(counts, labels, (1, 3), sigma=0.25, alpha=0.01).numpy()
    written = np.array([[float(v) for v in r[5:7]] for r in rows])
    np.testing.assert_allclose(written, radii, rtol=1e-9, equal_nan=True)
    top = np.argsort(-counts, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top, [[int(v) for v in r[2:5]] for r in rows])
    assert np.isfinite(radii[:, 1]).mean() > 0.8  # the trained model certifies most examples


@pytest.mark.ddp
def test_two_processes_write_the_same_files(single_run, digits_checkpoint):
    cwd = single_run.parent
    extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    result = certify(cwd, digits_checkpoint, "double", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rows(cwd / "double" / "certify.tsv") == read_rows(single_run / "certify.tsv")
    assert (cwd / "double" / "counts.txt").read_bytes() == (single_run / "counts.txt").read_bytes()
    assert len(list((cwd / "double" / "parts").glob("rank*.tsv"))) == 2


def test_resume_completes_an_interrupted_run(single_run, digits_checkpoint):
    """Keep the first rows of a finished run's part file, drop the final files: a rerun
    certifies only the missing examples and ends with the same files."""
    cwd = single_run.parent
    partial = cwd / "partial"
    interrupted_copy(single_run, partial, "certify.json", rows=10, cut=7)
    result = certify(cwd, digits_checkpoint, "partial")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rows(partial / "certify.tsv") == read_rows(single_run / "certify.tsv")
    assert (partial / "counts.txt").read_bytes() == (single_run / "counts.txt").read_bytes()
    assert len((partial / "parts" / "rank0.tsv").read_text().splitlines()) == EXAMPLES


@pytest.mark.slow
def test_reduced_precision_and_compile(single_run, digits_checkpoint):
    """`--autocast bf16 --compile true`: recorded with the run, another base classifier's
    counts (bf16 rounding moves some noisy samples across a decision boundary), the same
    consistency between counts, table and radii."""
    cwd = single_run.parent
    result = certify(cwd, digits_checkpoint, "bf16", "--autocast", "bf16", "--compile", "true")
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = json.loads((cwd / "bf16" / "certify.json").read_text())
    assert (metadata["autocast"], metadata["compile"]) == ("bf16", True)
    counts, labels = read_counts(cwd / "bf16" / "counts.txt")
    reference, _ = read_counts(single_run / "counts.txt")
    assert (counts.sum(axis=1) == N).all()
    assert not np.array_equal(counts, reference)
    assert np.abs(counts - reference).sum() < 0.05 * reference.sum()  # the same classifier
    rows = read_rows(cwd / "bf16" / "certify.tsv")[1:]
    radii = certified_radius(counts, labels, (1, 3), sigma=0.25, alpha=0.01).numpy()
    written = np.array([[float(v) for v in r[5:7]] for r in rows])
    np.testing.assert_allclose(written, radii, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--n", "301"),
        ("--seed", "8"),
        ("--skip", "2"),
        ("--channels_last", "true"),
        ("--autocast", "bf16"),
        ("--compile", "true"),
        ("--data.split_seed", "1"),  # other examples under the same indices
    ],
)
def test_other_settings_are_refused(single_run, digits_checkpoint, option, value):
    before = (single_run / "certify.tsv").read_bytes()
    result = certify(single_run.parent, digits_checkpoint, "single", option, value)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("topk-smoothing certify: error:") and "refusing to mix" in last
    assert f"holds a run with {option[2:].split('.')[0]} = " in last
    assert "Traceback" not in result.stderr
    assert (single_run / "certify.tsv").read_bytes() == before


class TestCohenCheckpoints:
    """Checkpoints released with Cohen et al. (2019): {"arch", "state_dict", ...}."""

    @staticmethod
    def cohen_file(tmp_path: Path, arch: str, num_classes: int, data_parallel: bool) -> tuple:
        torch.manual_seed(1)
        source = build_network(arch, num_classes, (0.5,) * 3, (0.25,) * 3, None)
        prefix = "1.module." if data_parallel else "1."
        state = {k.replace("1.", prefix, 1): v for k, v in source.state_dict().items()}
        path = tmp_path / f"{arch}.pth.tar"
        torch.save({"epoch": 90, "arch": arch, "state_dict": state, "optimizer": {}}, path)
        return path, source

    @pytest.mark.parametrize(
        ("arch", "num_classes", "data_parallel"),
        [("cifar_resnet110", 10, False), ("resnet50", 1000, True)],
    )
    def test_loads_their_layout(self, tmp_path, arch, num_classes, data_parallel):
        path, source = self.cohen_file(tmp_path, arch, num_classes, data_parallel)
        net = build_network(arch, num_classes, (0.0,) * 3, (1.0,) * 3, None)
        assert load_network_weights(net, path, arch) == "cohen"
        for (key, mine), theirs in zip(
            net.state_dict().items(), source.state_dict().values(), strict=True
        ):
            assert torch.equal(mine, theirs), key
        expected_mean = (
            (0.4914, 0.4822, 0.4465) if arch.startswith("cifar") else (0.485, 0.456, 0.406)
        )
        torch.testing.assert_close(net[0].mean.flatten(), torch.tensor(expected_mean))

    def test_refuses_another_architecture_or_class_count(self, tmp_path):
        path, _ = self.cohen_file(tmp_path, "cifar_resnet20", 10, False)
        with pytest.raises(
            CheckpointError, match="holds a cifar_resnet20, the config builds a cifar_resnet110"
        ):
            load_network_weights(
                build_network("cifar_resnet110", 10, (0,) * 3, (1,) * 3, None),
                path,
                "cifar_resnet110",
            )
        with pytest.raises(CheckpointError, match="another number of classes"):
            load_network_weights(
                build_network("cifar_resnet20", 100, (0,) * 3, (1,) * 3, None),
                path,
                "cifar_resnet20",
            )
