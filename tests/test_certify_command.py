"""`topk-smoothing certify`: files, consistency with `radius`, 2 processes, resume, refusal."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from certify.commands.checkpoints import load_network_weights
from certify.commands.countfile import read_counts
from certify.math.radius import certified_radius
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
    start_command,
    trainer_and_model,
)

N, EXAMPLES = 300, 12


def certify_args(ckpt: Path, out: Path, *extra) -> list:
    return [
        "certify", "--config", DIGITS, "--ckpt_path", ckpt, "--n", N, "--alpha", "0.01",
        "--k", "[1,3]", "--skip", "3", "--max_examples", EXAMPLES, "--seed", "7",
        "--output_dir", out, *QUIET, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(request, digits_checkpoint, tmp_path_factory):
    """The run on two processes (DDP), started first: it runs while the other tests run."""
    cwd = tmp_path_factory.mktemp("ddp")
    extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
    process = start_command(request, cwd, *certify_args(digits_checkpoint, cwd / "double", *extra))
    yield cwd / "double", process
    if process is not None and process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def single_run(two_processes, digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("certify") / "single"
    code, stdout, err = console(*certify_args(digits_checkpoint, out))
    assert code == 0, err[-3000:]
    return out, stdout


def test_output_files(single_run):
    out, stdout = single_run
    rows = read_rows(out / "certify.tsv")
    assert rows[0] == ["idx", "label", "pred1", "pred2", "pred3", "radius_top1", "radius_top3"]
    assert [int(r[0]) for r in rows[1:]] == list(range(0, 3 * EXAMPLES, 3))
    for name in ("counts.txt", "report.md", "report.csv", "certified_accuracy.png", "certify.json"):
        assert (out / name).is_file(), name
    assert f"examples: {EXAMPLES}, n: {N}" in (out / "report.md").read_text()
    assert f"certify: {EXAMPLES} examples, n = {N}, into {out}" in stdout
    assert stdout.splitlines()[-1].startswith(f"certify: {EXAMPLES} examples, ")


def test_counts_file_reproduces_the_radii(single_run):
    """counts.txt feeds `radius`: same radii without sampling again; rows sum to n."""
    out, _ = single_run
    counts, labels = read_counts(out / "counts.txt")
    assert (counts.sum(axis=1) == N).all()
    rows = read_rows(out / "certify.tsv")[1:]
    np.testing.assert_array_equal(labels, [int(r[1]) for r in rows])
    radii = certified_radius(counts, labels, (1, 3), sigma=0.25, alpha=0.01).numpy()
    written = np.array([[float(v) for v in r[5:7]] for r in rows])
    np.testing.assert_array_equal(written, radii)
    top = np.argsort(-counts, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top, [[int(v) for v in r[2:5]] for r in rows])
    assert np.isfinite(radii[:, 1]).mean() > 0.8  # the trained model certifies most examples


def test_resume_completes_an_interrupted_run(single_run, digits_checkpoint):
    """Keep the first rows of a finished run's part file, drop the final files: a rerun
    certifies only the missing examples and ends with the same files."""
    out, _ = single_run
    partial = out.parent / "partial"
    interrupted_copy(out, partial, "certify.json", rows=5, cut=7)
    code, stdout, err = console(*certify_args(digits_checkpoint, partial))
    assert code == 0, err[-3000:]
    assert f"5 of {EXAMPLES} examples already in {partial}, resuming" in stdout
    assert read_rows(partial / "certify.tsv") == read_rows(out / "certify.tsv")
    assert (partial / "counts.txt").read_bytes() == (out / "counts.txt").read_bytes()
    assert len((partial / "parts" / "rank0.tsv").read_text().splitlines()) == EXAMPLES
    code, stdout, _ = console(*certify_args(digits_checkpoint, partial))  # all done: a merge
    assert code == 0 and f"all {EXAMPLES} examples are already in {partial}; merging" in stdout


def test_reduced_precision(single_run, digits_checkpoint):
    """`--autocast bf16`: recorded with the run, another base classifier's counts (bf16
    rounding moves some noisy samples across a decision boundary), the same consistency
    between counts, table and radii."""
    out, _ = single_run
    bf16 = out.parent / "bf16"
    code, _, err = console(*certify_args(digits_checkpoint, bf16, "--autocast", "bf16"))
    assert code == 0, err[-3000:]
    metadata = json.loads((bf16 / "certify.json").read_text())
    assert (metadata["autocast"], metadata["compile"]) == ("bf16", False)
    counts, labels = read_counts(bf16 / "counts.txt")
    reference, _ = read_counts(out / "counts.txt")
    assert (counts.sum(axis=1) == N).all()
    assert not np.array_equal(counts, reference)
    assert np.abs(counts - reference).sum() < 0.05 * reference.sum()  # the same classifier
    rows = read_rows(bf16 / "certify.tsv")[1:]
    radii = certified_radius(counts, labels, (1, 3), sigma=0.25, alpha=0.01).numpy()
    np.testing.assert_array_equal(np.array([[float(v) for v in r[5:7]] for r in rows]), radii)


def test_other_settings_are_refused(single_run, digits_checkpoint, monkeypatch):
    """A rerun into the same directory with any setting that changes the results is refused
    in one line naming the setting, before anything is sampled or written (the compiler
    probe is skipped: the refusal comes first either way)."""
    monkeypatch.setattr("certify.sampling.options.check_compile", lambda device: None)
    out, _ = single_run
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = console(*certify_args(digits_checkpoint, out, "--data.split_seed", "1"))
    assert_one_line_error(result, "certify", "holds a run with data = ", "refusing to mix")
    result = console(*certify_args(digits_checkpoint, out, "--k", "3"))  # one k: a list of one
    assert_one_line_error(result, "certify", "top_k = [1, 3], this run has top_k = [3];")
    trainer, model = trainer_and_model(digits_checkpoint)
    same = dict(n=N, alpha=0.01, k=[1, 3], skip=3, max_examples=EXAMPLES, seed=7)
    for key, value in [
        ("n", 301), ("seed", 8), ("skip", 2), ("alpha", 0.02), ("k", [1, 2]),
        ("max_examples", EXAMPLES - 1), ("sigma", 0.5), ("bounds", "binocp"),
        ("channels_last", True), ("autocast", "bf16"), ("compile", True),
    ]:  # fmt: skip
        settings = dict(same, **{key: value}, output_dir=out)
        named = {"k": "top_k", "max_examples": "examples"}.get(key, key)  # the first to differ
        with pytest.raises(UsageError, match=f"holds a run with {named} = "):
            trainer.certify(model, DigitsDataModule(), digits_checkpoint, **settings)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_an_output_dir_that_is_a_file_is_named(digits_checkpoint, tmp_path, command):
    path = tmp_path / "results.txt"
    path.write_text("mine\n")
    args = [command, "--config", DIGITS, "--ckpt_path", digits_checkpoint, "--output_dir", path]
    assert_one_line_error(console(*args, *QUIET), command, f"output_dir {path} is a file")
    assert path.read_text() == "mine\n" and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("command", ["certify", "predict"])
def test_the_progress_bar_is_the_commands_and_counts_examples(digits_checkpoint, tmp_path, command):
    """Not Lightning's "Predicting DataLoader 0" over batches (here one batch of 3)."""
    sizes = ["--n0", "20"] if command == "predict" else []
    args = [command, "--config", DIGITS, "--ckpt_path", digits_checkpoint, "--n", "100", *sizes,
            "--max_examples", "3", "--output_dir", tmp_path / "out", *QUIET]  # fmt: skip
    code, out, err = console(*args, "--trainer.enable_progress_bar", "true")
    assert code == 0, err[-3000:]
    assert "Predicting" not in out + err
    assert re.search(rf"\r{command}: +0%\|[^|]*\| 0/3 \[.*example/s\]", err), err[-1000:]


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
            UsageError, match="holds a cifar_resnet20, the config builds a cifar_resnet110"
        ):
            load_network_weights(
                build_network("cifar_resnet110", 10, (0,) * 3, (1,) * 3, None),
                path,
                "cifar_resnet110",
            )
        with pytest.raises(UsageError, match="another number of classes"):
            load_network_weights(
                build_network("cifar_resnet20", 100, (0,) * 3, (1,) * 3, None),
                path,
                "cifar_resnet20",
            )


@pytest.mark.ddp
def test_two_processes_write_the_same_files(single_run, two_processes):
    (out, _), (double, process) = single_run, two_processes
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert read_rows(double / "certify.tsv") == read_rows(out / "certify.tsv")
    assert (double / "counts.txt").read_bytes() == (out / "counts.txt").read_bytes()
    assert len(list((double / "parts").glob("rank*.tsv"))) == 2
