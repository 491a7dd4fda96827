"""Datamodules: [0, 1] tensors, int labels, stable splits, torchvision's on-disk formats."""

import numpy as np
import pytest
import torch

from certify.math.validation import UsageError
from datamodules import CIFAR10DataModule, DigitsDataModule, ImageNetDataModule
from datamodules.cifar10 import UncheckedCIFAR10


def test_digits_split_is_fixed_disjoint_and_in_unit_range():
    dm = DigitsDataModule()
    dm.setup("fit")
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sizes == [1078, 359, 360]
    image, label = dm.val_dataset[5]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and type(label) is int
    images = torch.cat([d.tensors[0] for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    assert images.min() >= 0 and images.max() <= 1
    assert len(images) == 1797
    torch.testing.assert_close(images.mean(), torch.tensor(dm.mean[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(images.std(), torch.tensor(dm.std[0]), atol=1e-3, rtol=0)

    again = DigitsDataModule(batch_size=7)
    again.setup("test")
    assert torch.equal(again.val_dataset.tensors[0], dm.val_dataset.tensors[0])
    assert torch.equal(again.test_dataset.tensors[1], dm.test_dataset.tensors[1])
    other = DigitsDataModule(split_seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_dataset.tensors[1], dm.val_dataset.tensors[1])


def test_digits_split_indices_partition_the_data():
    from datamodules.digits import seeded_split

    train, val, test = seeded_split(1797, seed=0)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1797))


def test_digits_loaders_batch_and_shuffle_only_training():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    first = [next(iter(dm.val_dataloader()))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert torch.equal(first[0], dm.val_dataset.tensors[1][:32])


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_loaders_give_indices_and_shard_without_repeats(monkeypatch, split):
    """Validation and test batches carry each example's index in the split; under
    torch.distributed (2 processes here) the shards partition the split, none padded."""
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    dataset = getattr(dm, f"{split}_dataset")
    x, y, index = next(iter(getattr(dm, f"{split}_dataloader")()))  # (64, 1, 8, 8), (64,), (64,)
    assert index.tolist() == list(range(64)) and torch.equal(x, dataset.tensors[0][:64])
    assert torch.equal(y, dataset.tensors[1][:64])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        batches = list(getattr(dm, f"{split}_dataloader")())
        shards.append(torch.cat([index for _, _, index in batches]).tolist())
        for x, y, index in batches:
            assert torch.equal(x, dataset.tensors[0][index])
            assert torch.equal(y, dataset.tensors[1][index])
    assert sorted(shards[0] + shards[1]) == list(range(len(dataset)))  # 359 or 360, each once


def test_cifar10_reads_torchvision_files(cifar10_root):
    """The data set is written in the official layout and parsed by torchvision's CIFAR10.

    The official md5 sums cannot be matched by synthetic files (that would be an md5 preimage),
    so the test turns ``verify_md5`` off: the datamodule then uses torchvision's CIFAR10 class
    with its md5 sums dropped (existence is still required), and every byte is parsed by
    torchvision's own code. The md5 check itself is exercised by the next test.
    """
    root, images, labels = cifar10_root
    dm = CIFAR10DataModule(
        data_dir=str(root), verify_md5=False, val_size=0, batch_size=4, num_workers=0
    )
    assert dm.num_classes == 10 and dm.mean == (0.4914, 0.4822, 0.4465)
    dm.setup("fit")
    assert isinstance(dm.test_dataset, UncheckedCIFAR10)
    assert dm.test_dataset.classes[0] == "airplane"
    assert dm.val_dataset is dm.test_dataset  # val_size 0: the published recipe
    assert len(dm.train_dataset) == 20 and len(dm.test_dataset) == 12
    for i in (0, 11):
        image, label = dm.test_dataset[i]
        assert image.shape == (3, 32, 32) and type(label) is int and label == labels[i]
        torch.testing.assert_close(image, torch.from_numpy(images[i]).float() / 255)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y.shape == (4,)


def test_cifar10_checks_md5_and_missing_files(cifar10_root, tmp_path):
    root = cifar10_root[0]
    with pytest.raises(UsageError, match="do not match torchvision's md5 sums: data_batch_1, "):
        CIFAR10DataModule(data_dir=str(root))
    with pytest.raises(UsageError, match="CIFAR-10 data_dir '.*nowhere' is not a directory"):
        CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UsageError, match="lacks cifar-10-batches-py/data_batch_1, "):
        CIFAR10DataModule(data_dir=str(tmp_path), verify_md5=False)


def test_imagenet_folder_tree(imagenet_root):
    dm = ImageNetDataModule(
        data_dir=str(imagenet_root), val_per_class=0, batch_size=3, num_workers=0
    )
    assert dm.num_classes == 6 and dm.classes[0] == "n01440764"
    dm.setup("fit")
    assert len(dm.train_dataset) == 18 and len(dm.val_dataset) == 6
    assert dm.val_dataset is dm.test_dataset  # val_per_class 0: the published recipe
    image, label = dm.val_dataset[5]
    assert image.shape == (3, 224, 224) and type(label) is int and label == 5
    assert 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(dm.val_dataset[5][0], image)  # evaluation is deterministic
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 224, 224) and y.dtype == torch.int64


def test_imagenet_missing_or_inconsistent_tree(imagenet_root, tmp_path):
    with pytest.raises(UsageError, match="ImageNet data_dir '.*absent' is not a directory"):
        ImageNetDataModule(data_dir=str(tmp_path / "absent"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UsageError, match="ImageNet val folder '.*val' is not a directory"):
        ImageNetDataModule(data_dir=str(tmp_path))
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(UsageError, match="different class folders"):
        ImageNetDataModule(data_dir=str(tmp_path))
    (tmp_path / "val" / "b").rename(tmp_path / "val" / "a")  # same classes, no images
    dm = ImageNetDataModule(data_dir=str(tmp_path))
    with pytest.raises(UsageError, match="ImageNet folder '.*val': Found no valid file"):
        dm.setup("test")


def test_cifar10_validation_images_are_held_out_training_images(cifar10_root):
    """``val_size`` training images, unaugmented, never trained on; test is the test split."""
    root, test_images, _ = cifar10_root
    common = dict(data_dir=str(root), verify_md5=False, batch_size=4, num_workers=0)
    dm = CIFAR10DataModule(val_size=8, **common)
    dm.setup("fit")
    training_files = UncheckedCIFAR10(root, train=True)  # (20, 32, 32, 3) uint8, unshuffled
    val, train = dm.val_dataset.indices, dm.train_dataset.indices
    assert len(val) == 8 and len(train) == 12
    assert sorted(val + train) == list(range(20))  # disjoint, together all training images
    for i, index in enumerate(val):
        image, label = dm.val_dataset[i]  # the evaluation transform: the image as it is
        expected = torch.from_numpy(training_files.data[index]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
        assert label == training_files.targets[index]
    test = {bytes(image.tobytes()) for image in test_images}
    assert not test & {training_files.data[i].transpose(2, 0, 1).tobytes() for i in val}
    assert len(dm.test_dataset) == 12 and not dm.test_dataset.train
    again = CIFAR10DataModule(val_size=8, **common)
    again.setup("validate")
    assert again.val_dataset.indices == val  # a fixed choice (split_seed)
    other = CIFAR10DataModule(val_size=8, split_seed=1, **common)
    other.setup("fit")
    assert other.val_dataset.indices != val
    with pytest.raises(UsageError, match="val_size 50000 leaves none of the 50000"):
        CIFAR10DataModule(val_size=50_000, **common)


def test_imagenet_validation_images_come_from_train_folder(imagenet_root):
    dm = ImageNetDataModule(data_dir=str(imagenet_root), val_per_class=1, num_workers=0)
    dm.setup("fit")
    val_files = [dm.val_dataset.dataset.samples[i][0] for i in dm.val_dataset.indices]
    train_files = [dm.train_dataset.dataset.samples[i][0] for i in dm.train_dataset.indices]
    assert len(val_files) == 6 and len(train_files) == 12 and not set(val_files) & set(train_files)
    assert all("/train/" in path for path in val_files + train_files)
    labels = [dm.val_dataset[i][1] for i in range(6)]
    assert labels == list(range(6))  # one per class
    torch.testing.assert_close(dm.val_dataset[2][0], dm.val_dataset[2][0])  # no augmentation
    assert all("/val/" in path for path, _ in dm.test_dataset.samples)
    too_many = ImageNetDataModule(data_dir=str(imagenet_root), val_per_class=3, num_workers=0)
    with pytest.raises(UsageError, match="class 'n01440764' has 3 training images"):
        too_many.setup("fit")


def test_a_data_mistake_leaves_one_line_and_creates_no_run(isolated_run, capsys, cifar10_root):
    """A split the data cannot give ends the output with one line, exit status 2, and no W&B
    run: the CLI sets the data up before Lightning starts the logger's run."""
    from pathlib import Path

    from certify.commands.cli import main

    root, _, _ = cifar10_root
    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet110.yaml"
    args = ["fit", "--config", str(config), "--data.data_dir", str(root)]
    args += ["--data.verify_md5", "false", "--trainer.accelerator", "cpu"]
    args += ["--trainer.precision", "32-true", "--trainer.logger.init_args.offline", "true"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == "topk-smoothing fit: error: val_size 5000 leaves none of the 20 training images"
    )
    assert not Path("runs").exists()  # no run started, no folder

    import wandb  # a run of the caller's, open before the command, is left as it is

    caller = wandb.init(mode="offline", dir="mine", project="mine")
    assert main(args) == 2
    assert wandb.run is caller and Path(caller.dir).is_dir()
