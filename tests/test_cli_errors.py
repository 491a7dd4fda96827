"""User mistakes on the console commands: one line, ``topk-smoothing <cmd>: error: ...``
naming the bad value, exit status 2, no traceback, nothing on stdout and nothing written (the
checks run before Lightning builds the trainer, or before a logger starts a run).

Checkpoints: missing, not a checkpoint, without weights, a Lightning checkpoint of another
architecture or class count, and Cohen et al.'s layout (another architecture; or the right
one, which only `certify` and `predict` read). Fit-time option errors are in
test_training.py; pickled checkpoints in test_checkpoint_trust.py.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from certify.commands.cli import main
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


def fails_in_one_line(capsys, argv: list[str], *needles: str, names: tuple = ()) -> str:
    """``main(argv)`` exits with 2 after one line holding ``needles`` (and ``names`` as
    words of their own), prints nothing on stdout and writes nothing."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert_only_line(err, argv[0], *needles)
    assert_names(err, *names)
    assert out == ""
    assert not Path("out").exists() and not Path("runs").exists()
    return err


BAD_CHECKPOINTS = {
    "resnet20": ("does not fit the model: 1.conv1.weight has shape (16, 3, 3, 3)",),
    "five_classes": ("1.fc.weight has shape (5, 64)", "(another number of classes)"),
    "cohen_resnet110": ("holds a cifar_resnet110, the config builds a digits_cnn",),
    "cohen_digits": ("is one of Cohen et al.'s models", "only `topk-smoothing certify`"),
    "not_a_checkpoint": ("cannot be read",),
    "no_weights": ("holds no state_dict",),
    "missing": ("does not exist",),
    "text": ("cannot be read: ",),  # then torch.load's own reason, in its words
    "empty": ("cannot be read: ",),
    "directory": ("is a directory, not a checkpoint file",),
    "keyword_prefix": ("does not exist",),
}
#: Every case on `validate`; on the other commands, one refused at reading and one that does
#: not fit the model (the checks are the same code for every command).
CHECKPOINT_CASES = [("validate", case) for case in sorted(BAD_CHECKPOINTS)] + [
    (command, case)
    for command in ("fit", "test", "certify")
    for case in ("not_a_checkpoint", "five_classes" if command == "certify" else "cohen_digits")
]


@pytest.mark.parametrize(("command", "case"), CHECKPOINT_CASES)
def test_bad_checkpoint(isolated_run, capsys, checkpoints, command, case):
    extra = CERTIFY if command == "certify" else []
    path = str(checkpoints[case])
    argv = [command, "--config", DIGITS, "--ckpt_path", path, *QUIET, *extra]
    fails_in_one_line(capsys, argv, repr(path), *BAD_CHECKPOINTS[case])


#: certify's options: (arguments, the message) where the command words it, or (arguments,
#: None) where the option's type refuses it (the parser's wording: option and value named).
CERTIFY_MISTAKES = [
    (["--n", "0"], None),
    (["--n", "1.5"], None),
    (["--alpha", "0"], None),
    (["--alpha", "1"], None),
    (["--alpha", "1e-200"], "alpha must be at least 1e-100"),
    (["--k", "[0]"], None),
    (["--k", "[1,10]"], "k must satisfy 1 <= k < c = 10, got k = 10"),
    (["--k", "[1,1]"], "the k values must be distinct, got [1, 1]"),
    (["--k=[]"], "at least one k is needed"),
    (["--bounds", "exact"], None),
    (["--split", "train"], None),
    (["--skip", "0"], None),
    (["--max_examples", "0"], None),
    (["--batch_size", "0"], None),
    (["--sigma", "-0.25"], None),
    (["--sigma", "nan"], None),
    (["--autocast", "fp8"], None),
    (["--seed", "x"], None),
    (["--seed", str(2**64)], f"seed must lie in 0 .. 2**64 - 1, got {2**64}"),
    (["--compile", "maybe"], None),
    (["--output_dir", ""], "output_dir must name a directory, got ''"),
]


@pytest.mark.parametrize(
    ("args", "message"), CERTIFY_MISTAKES, ids=[" ".join(args) for args, _ in CERTIFY_MISTAKES]
)
def test_impossible_certify_settings(isolated_run, capsys, checkpoints, args, message):
    ckpt = str(checkpoints["cohen_digits"])  # certify reads Cohen et al.'s layout
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY, *args]
    option, value = args[0].removeprefix("--").split("=")[0], args[-1].split("=")[-1]
    fails_in_one_line(
        capsys, argv, *[message] if message else [], names=() if message else (option, value)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certify", "--config", DIGITS], "no --ckpt_path and no --model.weights"),
        (["validate", "--config", DIGITS, "--model.arch", "resnet5"], "unknown model 'resnet5'"),
        (["certify", "--config", DIGITS, "--model.arch", "resnet5"], "unknown model 'resnet5'"),
        (["test", "--config", CIFAR10, "--data.data_dir", "no/such/dir"], "no/such/dir"),
        (["certify", "--config", CIFAR10, "--data.data_dir", "no/such/dir"], "no/such/dir"),
        (["fit", "--config", DIGITS, "--seed_everything", "-1"], "0 .. 2**32 - 1, got -1"),
        (["fit", "--config", DIGITS, "--seed_everything", str(2**40)], f"got {2**40}"),
        (["fit", "--config", DIGITS, "--model.optimizer.lr", "-1"], "Invalid learning rate: -1"),
        (["fit", "--config", DIGITS, "--trainer.max_epochs", "many"], None),
        (["predict", "--config", DIGITS, "--k", "0"], None),
    ],
)
def test_start_up_mistakes(isolated_run, capsys, argv, message):
    """Refused before anything runs: random weights for certify, an unknown model, a missing
    data directory, a seed out of range, an optimizer setting only the optimizer refuses, and
    values the options' types refuse (the parser's wording: option and value named)."""
    extra = CERTIFY if argv[0] == "certify" else []
    names = () if message else (argv[-2].removeprefix("--").split(".")[-1], argv[-1])
    fails_in_one_line(capsys, [*argv, *QUIET, *extra], *filter(None, [message]), names=names)


def test_compile_without_a_compiler_fails_before_writing(
    isolated_run, capsys, checkpoints, monkeypatch
):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/g++"))
    ckpt = str(checkpoints["cohen_digits"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    message = "compile is on but torch.compile fails on cpu: InvalidCxxCompiler"
    fails_in_one_line(capsys, [*argv, "--compile", "true"], message, "/nonexistent/g++")


def test_a_batch_size_beyond_memory_is_one_line(isolated_run, capsys, checkpoints):
    ckpt = str(checkpoints["cohen_digits"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    message = (
        f"batch_size {10**10} does not fit in memory (tried to allocate 2560000000000 bytes); "
        "choose a smaller --batch_size, or leave it out to have one chosen"
    )  # 2.56 TB
    assert main([*argv, "--batch_size", str(10**10), "--n", str(10**10)]) == 2
    assert_only_line(capsys.readouterr().err, "certify", message)


@pytest.mark.parametrize(
    ("command", "init_args", "message"),
    [
        ("fit", "{top_k: [1, 10], n: 10}", "top_k: k must satisfy 1 <= k < c = 10, got k = 10"),
        ("validate", "{top_k: [1, 1], n: 10}", "the k values must be distinct"),
        ("fit", "{batch_size: 0, n: 10}", "batch_size must be an integer >= 1, got 0"),
        ("validate", "{seed: -1, n: 10}", "seed must lie in 0 .. 2**64 - 1, got -1"),
    ],
)
def test_certification_callback_mistakes_stop_the_start(
    isolated_run, capsys, command, init_args, message
):
    Path("callback.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: certify.CertificationCallback\n"
        f"      init_args: {init_args}\n"
    )
    fails_in_one_line(
        capsys, [command, "--config", DIGITS, "--config", "callback.yaml", *QUIET], message
    )


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
        args += ["--model.weights", "resnet18.pt", "--k", "[1]", *CERTIFY]
    fails_in_one_line(capsys, args, "'empty_tree/", "Found no valid file for the classes a, b")


def test_output_directory_refusals_are_the_only_line(isolated_run, capsys, checkpoints):
    Path("out").mkdir()
    Path("out", "parts").write_text("a file where the parts folder goes\n")
    ckpt = str(checkpoints["cohen_digits"])
    assert main(["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]) == 2
    message = "cannot create output directory out/parts: File exists"
    assert_only_line(capsys.readouterr().err, "certify", message)


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
        assert main(["report", *args]) == 2, args
        captured = capsys.readouterr()
        assert_only_line(captured.err, "report", message)
        assert captured.out == ""
    assert main(["report", good, "--n", "many"]) == 2  # the parser's own wording
    captured = capsys.readouterr()
    assert_only_line(captured.err, "report")
    assert_names(captured.err, "--n", "many")
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tsv")) == ["a_file"]


def test_the_console_command_fails_in_one_line(checkpoints, tmp_path):
    """The real console path (`python -m certify`): nothing but the error line, no traceback,
    no trainer banner, nothing written."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    ckpt = str(checkpoints["resnet20"])
    argv = ["certify", "--config", DIGITS, "--ckpt_path", ckpt, *QUIET, *CERTIFY]
    done = subprocess.run(
        [sys.executable, "-m", "certify", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    assert_only_line(done.stderr, "certify", "does not fit the model")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_hyperparameters_that_replace_the_config_are_named(
    isolated_run, capsys, digits_checkpoint
):
    """A checkpoint's hyperparameters replace the config's model arguments: a --model.sigma
    that the checkpoint overrides is named in a note, not dropped without a word."""
    args = ["validate", "--config", DIGITS, "--ckpt_path", str(digits_checkpoint), *QUIET]
    args += ["--trainer.limit_val_batches", "0"]
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


def test_a_progress_bar_callback_without_a_bar_is_one_line(isolated_run, capsys):
    """Lightning refuses a progress-bar callback with ``enable_progress_bar: false``."""
    Path("bar.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: pytorch_lightning.callbacks.TQDMProgressBar\n"
    )
    argv = ["validate", "--config", DIGITS, "--config", "bar.yaml", *QUIET]
    fails_in_one_line(capsys, argv, "enable_progress_bar=False", "TQDMProgressBar")
