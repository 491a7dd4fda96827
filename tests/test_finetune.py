"""Fine-tuning on one's own data set from the shipped config: only ``data_dir`` and the weights
change. A generated 3-class ImageFolder and a local ResNet-50 state dict: the config's
``model.top_k: [1, 3, 5]`` keeps k = 1 with a one-line note, and the run trains with the
config's W&B logger (offline); without a logger the learning-rate monitor is left out."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import LearningRateMonitor

from certify.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
FINETUNE = str(REPO / "configs" / "imagenet_resnet50_finetune.yaml")
CLASSES = ("cat", "dog", "fox")
#: Options that only keep the test short: the run itself needs none of them.
SHORT = [  # 2 batches each: "1" would read as 1.0, all batches (Trainer's float | int)
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
    "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "2", "--data.num_workers", "0",
    "--trainer.precision", "32-true",
    "--trainer.callbacks.init_args.n", "16", "--trainer.callbacks.init_args.num_examples", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> tuple[Path, Path]:
    """``(data_dir, weights)``: train/ 16 and val/ 4 small JPEGs per class, and a ResNet-50
    state dict with torchvision's 1000-class head, saved with ``torch.save``."""
    root = tmp_path_factory.mktemp("three_classes")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 16), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class you can see
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", format="JPEG")
    torch.manual_seed(0)
    weights = root / "resnet50_pretrained.pth"
    torch.save(torchvision.models.resnet50(num_classes=1000).state_dict(), weights)
    return root, weights


@pytest.mark.slow
def test_finetune_config_on_a_three_class_image_folder(isolated_run, capsys, own_data):
    import wandb

    root, weights = own_data
    args = ["fit", "--config", FINETUNE, "--data.data_dir", str(root)]
    args += ["--model.weights", str(weights), *SHORT]
    try:
        assert main(args) == 0, capsys.readouterr().err[-3000:]
    finally:
        wandb.finish()
    out, err = capsys.readouterr()
    assert "| top-1 |" in out and "| top-3 |" not in out  # live certification, k below 3
    assert (
        "topk-smoothing fit: note: model.top_k 3, 5 dropped: the data has 3 classes "
        "(accuracies for k = 1)"
    ) in err
    assert "Traceback" not in err
    last = list(Path("runs").rglob("checkpoints/last.ckpt"))
    assert len(last) == 1
    checkpoint = torch.load(last[0], map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["net.1.fc.weight"].shape == (3, 2048)  # a new 3-class head
    assert "wandb" in {p.name for p in Path("runs").iterdir()}


def test_without_a_logger_the_learning_rate_monitor_is_left_out(
    isolated_run, own_data, lightning_cli
):
    """The config's LearningRateMonitor would stop a fit that has no logger to log to."""
    root, weights = own_data
    args = ["--config", FINETUNE, "--data.data_dir", str(root), "--model.weights"]
    cli = lightning_cli(
        *args, weights, "--trainer.logger", "false", "--model.top_k", "[1]", run=False
    )
    assert cli.trainer.logger is None and cli.model.net[1].fc.out_features == 3
    assert not any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
