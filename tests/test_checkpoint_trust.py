"""Checkpoints load with ``weights_only=True`` only: a file holding pickled Python objects is
refused in one line naming ``--trust_checkpoint true`` (exit 2), by every subcommand, before
anything runs; with the option it loads, Lightning's own loading included. Cohen et al.'s
released layout (``arch``, ``state_dict``, optimizer state; zip or legacy format) loads by
default; and certifying one checkpoint after another needs no ``--output_dir``."""

import argparse
from pathlib import Path

import pytest
import torch

from certify.commands.checkpoints import read_checkpoint
from certify.commands.cli import main
from certify.math.validation import UsageError
from lightning_modules.models import build_network

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
SMALL = {
    "fit": ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"],
    "validate": ["--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]"],
    "test": ["--trainer.limit_test_batches", "1"],
    "certify": ["--n", "10", "--max_examples", "2", "--output_dir", "out"],
    "predict": ["--n0", "10", "--n", "10", "--max_examples", "2", "--output_dir", "out"],
}


@pytest.fixture(scope="module")
def pickled_checkpoint(digits_checkpoint, tmp_path_factory) -> Path:
    """Our digits checkpoint with one pickled Python object added (an ``argparse.Namespace``:
    loading it calls Python code, which ``weights_only`` refuses)."""
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["notes"] = argparse.Namespace(epochs=4)
    path = tmp_path_factory.mktemp("pickled") / "pickled.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("command", sorted(SMALL))
def test_a_pickled_checkpoint_is_refused_in_one_line(
    isolated_run, capsys, pickled_checkpoint, command
):
    args = [command, "--config", DIGITS, "--ckpt_path", str(pickled_checkpoint), *QUIET]
    assert main([*args, *SMALL[command]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        f"topk-smoothing {command}: error: checkpoint {str(pickled_checkpoint)!r} holds pickled "
        "Python objects (argparse.Namespace), whose loading can run any code: refused; if you "
        "trust the file, pass --trust_checkpoint true"
    )
    assert not Path("out").exists() and not Path("runs").exists()


@pytest.mark.parametrize("command", ["validate", "certify", "predict"])
def test_with_the_option_it_loads(isolated_run, capsys, pickled_checkpoint, command):
    """``validate`` goes through Lightning's own loading (``Trainer.validate(ckpt_path=...)``),
    which would refuse the file too without ``weights_only=False``."""
    args = [command, "--config", DIGITS, "--ckpt_path", str(pickled_checkpoint), *QUIET]
    assert main([*args, *SMALL[command], "--trust_checkpoint", "true"]) == 0
    if command != "validate":
        assert any(Path("out").glob("*.tsv"))


def test_read_checkpoint_in_python(pickled_checkpoint):
    with pytest.raises(UsageError, match="pass --trust_checkpoint true"):
        read_checkpoint(pickled_checkpoint)
    assert read_checkpoint(pickled_checkpoint, trust=True)["notes"].epochs == 4


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_cohen_layout_loads_with_weights_only(tmp_path, legacy):
    """Their files: ``{"epoch", "arch", "state_dict", "optimizer"}`` from ``torch.save``, with
    SGD momentum buffers; the legacy (pre-1.6) serialisation as well as the zip format."""
    net = build_network("cifar_resnet20", 10, (0.5,) * 3, (0.25,) * 3, None)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    saved = {"epoch": 90, "arch": "cifar_resnet20", "state_dict": net.state_dict()}
    saved["optimizer"] = optimizer.state_dict()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    loaded = read_checkpoint(path)
    assert loaded["arch"] == "cifar_resnet20" and loaded["epoch"] == 90
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in net.state_dict().items())
    assert loaded["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_two_checkpoints_certified_one_after_the_other(isolated_run, capsys, digits_checkpoint):
    """No --output_dir: each checkpoint gets its own directory (run, file name, sha256, split,
    n, sigma, k), so the second is not refused; the same command again resumes its own."""
    other = Path("other.ckpt")
    checkpoint = torch.load(digits_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["net.1.fc.bias"] += 0.01
    torch.save(checkpoint, other)
    args = ["--config", DIGITS, *QUIET, "--n", "20", "--max_examples", "3", "--k", "[1,3]"]
    for ckpt in (digits_checkpoint, other, digits_checkpoint):
        assert main(["certify", "--ckpt_path", str(ckpt), *args]) == 0
    folders = sorted(p.name for p in Path("runs", "certify").iterdir())
    assert len(folders) == 2
    assert all(name.endswith("_test_n20_sigma0.25_k1-3") for name in folders)
    assert any(name.startswith("other-") for name in folders)
    assert any(name.startswith("digits-") for name in folders)
    assert "all 3 examples are already in" in capsys.readouterr().out


def test_a_pickled_weights_file_is_never_unpickled(tmp_path):
    """``--model.weights`` files are state dicts, read weights only (no option lifts it): a file
    with Python objects is refused with what to do instead."""
    from lightning_modules.models import build_backbone, load_weights

    state = build_backbone("digits_cnn", 10, 1).state_dict()
    torch.save({"state_dict": state, "notes": argparse.Namespace(epochs=4)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(argparse.Namespace\)"):
        load_weights("digits_cnn", str(tmp_path / "w.pt"))
