"""User mistakes on `validate`, `test`, `certify` (and `fit` resumes), and `report`: one line,
``topk-smoothing <cmd>: error: ...`` naming the bad value, exit status 2, no traceback, and
nothing else printed (the checks run before Lightning builds the trainer).

Checkpoints: missing, not a checkpoint, without weights, a Lightning checkpoint of another
architecture or class count, and Cohen et al.'s layout (another architecture; or the right
one, which only `certify` reads). Fit-time option errors are in test_training.py.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certify.commands.cli import main as console_main
from lightning_modules.cli import main
from lightning_modules.models import build_backbone, build_network
from tests.messages import assert_names

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
CIFAR10 = str(REPO / "configs" / "cifar10_resnet110.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
CERTIFY = ["--n", "10", "--max_examples", "2", "--output_dir", "out"]


@pytest.fixture(scope="module")
def checkpoints(digits_checkpoint, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_checkpoints")
    ours = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    paths = {}

    def lightning(name: str, arch: str, num_classes: int, mean: tuple, std: tuple) -> None:
        checkpoint = copy.deepcopy(ours)
        net = build_network(arch, num_classes, mean, std, None)
        checkpoint["state_dict"] = {f"net.{k}": v for k, v in net.state_dict().items()}
        checkpoint["hyper_parameters"].update(
            arch=arch, num_classes=num_classes, mean=mean, std=std
        )
        paths[name] = folder / f"{name}.ckpt"
        torch.save(checkpoint, paths[name])

    def cohen(name: str, arch: str, num_classes: int, channels: int) -> None:
        net = build_network(arch, num_classes, (0.5,) * channels, (0.25,) * channels, None)
        paths[name] = folder / f"{name}.pth.tar"
        torch.save({"epoch": 90, "arch": arch, "state_dict": net.state_dict()}, paths[name])

    lightning("resnet20", "cifar_resnet20", 10, (0.5,) * 3, (0.25,) * 3)
    lightning("five_classes", "digits_cnn", 5, (0.3,), (0.4,))
    cohen("cohen_resnet110", "cifar_resnet110", 10, 3)
    cohen("cohen_digits", "digits_cnn", 10, 1)
    paths["not_a_checkpoint"] = folder / "notes.ckpt"
    paths["not_a_checkpoint"].write_text("not a checkpoint\n")
    paths["no_weights"] = folder / "no_weights.ckpt"
    torch.save({"epoch": 3}, paths["no_weights"])
    paths["missing"] = folder / "missing.ckpt"
    paths["text"] = folder / "hello.ckpt"
    paths["text"].write_text("hello\n")  # unpickling it fails with a KeyError
    paths["empty"] = folder / "empty.ckpt"
    paths["empty"].write_bytes(b"")
    paths["directory"] = folder / "folder.ckpt"
    paths["directory"].mkdir()
    paths["keyword_prefix"] = folder / "best-epoch999.ckpt"  # not Lightning's "best"
    return paths


def assert_only_line(err: str, command: str, *needles: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"topk-smoothing {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_CHECKPOINTS = {
    "resnet20": ("does not fit the model: 1.conv1.weight has shape (16, 3, 3, 3)",),
    "five_classes": ("1.fc.weight has shape (5, 64)", "(another number of classes)"),
    "cohen_resnet110": ("holds a cifar_resnet110, the config builds a digits_cnn",),
    "not_a_checkpoint": ("cannot be read",),
    "no_weights": ("holds no state_dict",),
    "missing": ("does not exist",),
    "text": ("cannot be read: ",),  # then torch.load's own reason, in its words
    "empty": ("cannot be read: ",),
    "directory": ("is a directory, not a checkpoint file",),
    "keyword_prefix": ("does not exist",),
}


@pytest.mark.parametrize(
    ("command", "case"),
    [
        (command, case)
        for case in sorted(BAD_CHECKPOINTS)
        for command in ("fit", "validate", "test", "certify")
        if (command, case) != ("fit", "missing")  # in test_training.py
    ],
)
def test_bad_checkpoint(isolated_run, capsys, checkpoints, command, case):
    extra = CERTIFY if command == "certify" else []
    args = [command, "--config", DIGITS, "--ckpt_path", str(checkpoints[case]), *QUIET, *extra]
    assert main(args) == 2
    assert_only_line(
        capsys.readouterr().err, command, repr(str(checkpoints[case])), *BAD_CHECKPOINTS[case]
    )
    assert not Path("out").exists() and not Path("runs").exists()


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_cohen_checkpoint_is_for_certify_only(isolated_run, capsys, checkpoints, command):
    path = str(checkpoints["cohen_digits"])
    assert main([command, "--config", DIGITS, "--ckpt_path", path, *QUIET]) == 2
    assert_only_line(
        capsys.readouterr().err,
        command,
        repr(path),
        "Cohen et al.",
        "only `topk-smoothing certify`",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "n must be an integer >= 1, got 0"),
        (["--alpha", "0"], "alpha must lie strictly between 0 and 1, got 0.0"),
        (["--alpha", "1"], "alpha must lie strictly between 0 and 1, got 1.0"),
        (["--k", "0"], "k must be >= 1, got k = 0"),
        (["--k", "1", "10"], "k must satisfy 1 <= k < c = 10, got k = 10"),
        (["--bounds", "exact"], "bounds must be 'simuem' or 'binocp', got 'exact'"),
        (["--split", "train"], "split must be 'test' or 'val', got 'train'"),
        (["--skip", "0"], "skip must be an integer >= 1, got 0"),
        (["--max_examples", "0"], "max_examples must be an integer >= 1, got 0"),
        (["--batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
        (["--sigma", "-0.25"], "sigma must be a finite number > 0, got -0.25"),
        (["--autocast", "fp8"], "autocast must be 'bf16' or 'fp16', got 'fp8'"),
        (["--seed", str(2**64)], f"seed must lie in 0 .. 2**64 - 1, got {2**64}"),
        (["--k", "1", "1"], "the k values must be distinct, got [1, 1]"),
        (["--k=[]"], "at least one k is needed"),
        (["--output_dir", ""], "output_dir must name a directory, got ''"),
    ],
)
def test_impossible_certify_settings(isolated_run, capsys, checkpoints, args, message):
    ckpt = str(checkpoints["cohen_digits"])  # certify reads Cohen et al.'s layout
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY, *args]
    assert main(argv) == 2
    assert_only_line(capsys.readouterr().err, "certify", message)
    assert not Path("out").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("n", "1.5"), ("sigma", "nan"), ("seed", "x"), ("compile", "maybe")]
)
def test_certify_values_of_the_wrong_type(isolated_run, capsys, checkpoints, option, value):
    """A value the option's type cannot take (found by the command-line parser, whose wording
    is its own): exit status 2, one line naming the option and the value, nothing written."""
    ckpt = str(checkpoints["cohen_digits"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    assert main([*argv, f"--{option}", value]) == 2
    captured = capsys.readouterr()
    assert_only_line(captured.err, "certify")
    assert_names(captured.err, option, value)
    assert captured.out == ""
    assert not Path("out").exists() and not Path("runs").exists()


def test_certify_refuses_random_weights(isolated_run, capsys):
    """Without --ckpt_path or --model.weights the network is as initialised: refused, not
    certified (a certificate of random weights is nothing anyone wants)."""
    assert main(["certify", "--config", DIGITS, *QUIET, *CERTIFY]) == 2
    message = "no --ckpt_path and no --model.weights: the network has its random initial weights"
    assert_only_line(capsys.readouterr().err, "certify", message)
    assert not Path("out").exists()


def test_compile_without_a_compiler_fails_before_writing(
    isolated_run, capsys, checkpoints, monkeypatch
):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    ckpt = str(checkpoints["cohen_digits"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    assert main([*argv, "--compile", "true"]) == 2
    message = "compile is on but torch.compile fails on cpu: InvalidCxxCompiler"
    assert_only_line(capsys.readouterr().err, "certify", message, "/nonexistent/g++")
    assert not Path("out").exists()


@pytest.mark.parametrize("command", ["validate", "test", "certify"])
def test_unknown_model_and_missing_data_directory(isolated_run, capsys, command):
    unknown = [command, "--config", DIGITS, "--model.arch", "resnet5", *QUIET]
    assert main(unknown) == 2
    assert_only_line(capsys.readouterr().err, command, "unknown model 'resnet5'; choose one of")
    no_data = [command, "--config", CIFAR10, "--data.data_dir", "no/such/dir", *QUIET]
    assert main(no_data) == 2
    assert_only_line(capsys.readouterr().err, command, "data_dir 'no/such/dir' is not a directory")


def test_report_rejections(tmp_path, capsys):
    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    good = write("good.tsv", "idx\tlabel\tradius_top1\n0\t1\t0.5\n")
    (tmp_path / "a_file").write_text("")
    cases = [
        ([str(tmp_path / "none.tsv")], "none.tsv: no such file"),
        ([write("empty.tsv", "")], "empty.tsv: the file is empty"),
        ([write("header.tsv", "idx\tlabel\tradius_top1\n")], "no examples (only a header)"),
        ([write("columns.tsv", "idx\tlabel\n0\t1\n")], "no radius_top{k} column"),
        ([write("ragged.tsv", "idx\tradius_top1\n0\t0.5\n1\n")], "line 3 has 1 fields, expected 2"),
        ([write("text.tsv", "idx\tradius_top1\n0\tbig\n")], "line 2 has a radius that is not"),
        ([write("negative.tsv", "idx\tradius_top1\n0\t-0.5\n")], "negative radius"),
        ([good, "--radii", "-1"], "radii must be finite numbers >= 0, got [-1.0]"),
        ([good, "--radii", "nan"], "radii must be finite numbers >= 0, got [nan]"),
        ([good, "--n", "0"], "n must be an integer >= 1, got 0"),
        ([good, "--output-dir", str(tmp_path / "a_file")], "a_file"),
        (
            [write("k0.tsv", "idx\tradius_top0\n0\t0.5\n"), "--output-dir", str(tmp_path / "r")],
            "k must be >= 1, got k = 0",
        ),
    ]
    for args, message in cases:
        assert console_main(["report", *args]) == 2, args
        captured = capsys.readouterr()
        assert_only_line(captured.err, "report", message)
        assert captured.out == ""
    assert console_main(["report", good, "--n", "many"]) == 2  # the parser's own wording
    captured = capsys.readouterr()
    assert_only_line(captured.err, "report")
    assert_names(captured.err, "--n", "many")
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tsv")) == ["a_file"]


@pytest.mark.slow
def test_console_commands_fail_in_one_line(checkpoints, tmp_path):
    """The real console path (`python -m certify`), in parallel: nothing but the error line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cases = [
        (["certify", "--ckpt_path", str(checkpoints["resnet20"]), *CERTIFY], "does not fit"),
        (["validate", "--ckpt_path", str(checkpoints["cohen_digits"])], "only `topk-smoothing"),
        (["test", "--ckpt_path", str(checkpoints["five_classes"])], "another number of classes"),
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "certify", args[0], "--config", DIGITS, *args[1:], *QUIET],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for args, _ in cases
    ]
    for process, (args, message) in zip(processes, cases, strict=True):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, err[-3000:]
        assert "Traceback" not in err and out == "", err[-3000:]
        assert_only_line(err, args[0], message)
    assert list(tmp_path.iterdir()) == []  # no runs/, no output directory


def test_checkpoint_hyperparameters_that_replace_the_config_are_named(
    isolated_run, capsys, digits_checkpoint
):
    """LightningCLI reads a checkpoint's hyperparameters back over the config: a --model.sigma
    that the checkpoint overrides is named in a note, not dropped without a word."""
    args = ["validate", "--config", DIGITS, "--ckpt_path", str(digits_checkpoint), *QUIET]
    args += ["--trainer.limit_val_batches", "1"]
    assert main([*args, "--model.sigma", "0.5"]) == 0
    err = capsys.readouterr().err
    assert (
        "topk-smoothing validate: note: the checkpoint's hyperparameters replace the config's: "
        "model.sigma 0.5 -> 0.25"
    ) in err
    assert main(args) == 0  # the config agrees with the checkpoint: no note
    assert "note:" not in capsys.readouterr().err
    consistency = str(REPO / "configs" / "digits_consistency.yaml")
    assert main([*args[:2], consistency, *args[3:]]) == 0  # a Gaussian-trained checkpoint
    assert "model.loss 'consistency' -> 'gaussian'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ("{top_k: [1, 10], n: 10}", "top_k: k must satisfy 1 <= k < c = 10, got k = 10"),
        ("{top_k: [1, 1], n: 10}", "the k values must be distinct"),
        ("{batch_size: 0, n: 10}", "batch_size must be an integer >= 1, got 0"),
        ("{seed: -1, n: 10}", "seed must lie in 0 .. 2**64 - 1, got -1"),
    ],
)
@pytest.mark.parametrize("command", ["fit", "validate"])
def test_certification_callback_mistakes_stop_the_start(
    isolated_run, capsys, command, init_args, message
):
    config = Path("callback.yaml")
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: certify.CertificationCallback\n"
        f"      init_args: {init_args}\n"
    )
    assert main([command, "--config", DIGITS, "--config", str(config), *QUIET]) == 2
    assert_only_line(capsys.readouterr().err, command, message)
    assert not Path("runs").exists()


@pytest.mark.parametrize("command", ["fit", "certify"])
def test_an_image_tree_without_images_is_named_in_one_line(isolated_run, capsys, command):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            Path("empty_tree", split, cls).mkdir(parents=True)
    args = [
        command, "--model.arch", "resnet18", "--model.top_k", "[1]",
        "--data", "datamodules.ImageNetDataModule", "--data.data_dir", "empty_tree",
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", *QUIET,
    ]  # fmt: skip
    if command == "certify":  # weights from a file: certify refuses random ones
        torch.save(build_backbone("resnet18", 2).state_dict(), "resnet18.pt")
        args += ["--model.weights", "resnet18.pt", "--k", "1", "--n", "10", "--output_dir", "out"]
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    folder = "ImageNet train folder 'empty_tree/train'" if command == "fit" else "ImageNet val"
    assert last.startswith(f"topk-smoothing {command}: error: {folder}")
    assert "Found no valid file for the classes a, b" in last
    assert "Traceback" not in err and not Path("out").exists()


def test_a_batch_size_beyond_memory_is_one_line(isolated_run, capsys, checkpoints):
    ckpt = str(checkpoints["cohen_digits"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    assert main([*argv, "--batch_size", str(10**10), "--n", str(10**10)]) == 2  # 2.56 TB
    message = (
        f"batch_size {10**10} does not fit in memory (tried to allocate 2560000000000 bytes); "
        "choose a smaller --batch_size, or leave it out to have one tuned"
    )
    assert_only_line(capsys.readouterr().err, "certify", message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed_everything", "-1"], "seed_everything must lie in 0 .. 2**32 - 1, got -1"),
        (["--seed_everything", str(2**40)], f"got {2**40}"),
        (["--model.optimizer.lr", "-1"], "model.lr_scheduler: Invalid learning rate: -1.0"),
    ],
)
def test_fit_settings_that_fail_late_are_caught_at_start_up(isolated_run, capsys, args, message):
    assert main(["fit", "--config", DIGITS, *QUIET, *args]) == 2
    assert_only_line(capsys.readouterr().err, "fit", message)
    assert not Path("runs").exists()


def test_output_directory_refusals_are_the_only_line(isolated_run, capsys, checkpoints):
    Path("out").mkdir()
    Path("out", "parts").write_text("a file where the parts folder goes\n")
    ckpt = str(checkpoints["cohen_digits"])
    assert main(["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]) == 2
    message = "cannot create output directory out/parts: File exists"
    assert_only_line(capsys.readouterr().err, "certify", message)
