"""Model registry, normalisation first, Cohen et al.'s CIFAR ResNet layout, pretrained weights."""

import urllib.error

import pytest
import torch
import torchvision
from jsonargparse import ArgumentError
from torch import nn

from certify.math.validation import UsageError
from lightning_modules import MODELS, NoisyClassifier, NormalizeLayer, build_backbone, build_network
from lightning_modules.cifar_resnet import CifarResNet
from tests.conftest import parse_init
from tests.messages import assert_names

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def test_registry_names_and_unknown_name():
    assert {"digits_cnn", "cifar_resnet20", "cifar_resnet110"} <= set(MODELS)
    assert {"resnet18", "resnet50", "resnet101"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'resnet1000'; choose one of: .*resnet50"):
        build_backbone("resnet1000", 10)


@pytest.mark.parametrize(
    ("arch", "shape", "in_channels"),
    [
        ("digits_cnn", (1, 8, 8), 1),
        ("cifar_resnet20", (3, 32, 32), 3),
        ("resnet18", (3, 64, 64), 3),
    ],
)
def test_networks_map_pixels_to_logits_with_normalisation_first(arch, shape, in_channels):
    mean, std = MEAN[:in_channels], STD[:in_channels]
    net = build_network(arch, 7, mean, std).eval()
    assert isinstance(net[0], NormalizeLayer)
    assert net(torch.rand(2, *shape)).shape == (2, 7)
    assert isinstance(net[1].fc, nn.Linear) and net[1].fc.out_features == 7


def test_normalize_layer_standardises_and_keeps_no_state():
    layer = NormalizeLayer(MEAN, STD)
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    assert layer.state_dict() == {}
    with pytest.raises(ValueError, match="std must be > 0"):
        NormalizeLayer((0.5,), (0.0,))


@pytest.mark.parametrize(("depth", "params"), [(20, 272_474), (110, 1_730_714)])
def test_cifar_resnet_matches_cohen_layout(depth, params):
    model = CifarResNet(depth, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params  # bearpaw/Cohen counts
    blocks = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    keys = set(model.state_dict())
    expected = {
        "conv1.weight", "bn1.running_mean", "fc.weight", "fc.bias",
        "layer1.0.conv1.weight", "layer1.0.bn2.running_var", f"layer3.{blocks - 1}.conv2.weight",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight",
        "layer3.0.downsample.1.running_mean",
    }  # fmt: skip
    assert expected <= keys
    assert not any(k.startswith("layer1.0.downsample") for k in keys)  # 16 -> 16, stride 1
    if depth == 20:  # the same code for every depth: one forward pass
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_cohen_checkpoint_keys_load_after_dropping_module_prefix():
    """Cohen et al.'s checkpoints: ``Sequential(NormalizeLayer, DataParallel(resnet))``."""
    theirs = {f"1.module.{k}": v for k, v in CifarResNet(110).state_dict().items()}
    net = build_network("cifar_resnet110", 10, MEAN, STD)
    net.load_state_dict({k.replace("1.module.", "1.", 1): v for k, v in theirs.items()})
    torch.testing.assert_close(net[1].fc.weight, theirs["1.module.fc.weight"])


def test_digits_cnn_is_cheap():
    """About 0.16 M multiply-adds per 8x8 image (certification runs it thousands of times)."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output[0].numel() * module.in_channels * module.kernel_size[0] ** 2
        elif isinstance(module, nn.Linear):
            macs += module.in_features * module.out_features

    model = build_backbone("digits_cnn", 10, in_channels=1)
    for module in model.modules():
        module.register_forward_hook(count)
    model.eval()(torch.rand(1, 1, 8, 8))
    assert 0.1e6 < macs < 0.3e6


def assert_same_backbone(model: nn.Module, state: dict, skip_head: bool) -> None:
    for key, value in model.state_dict().items():
        if not (skip_head and key.startswith("fc.")):
            assert torch.equal(value, state[key]), key


def test_pretrained_torchvision_weights_from_seeded_torch_home(seed_torch_hub, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    state = seed_torch_hub("resnet18", "IMAGENET1K_V1")
    same = build_backbone("resnet18", 1000, weights="IMAGENET1K_V1")
    assert_same_backbone(same, state, skip_head=False)
    assert_same_backbone(build_backbone("resnet18", 1000, weights="DEFAULT"), state, False)
    new_head = build_backbone("resnet18", 10, weights="IMAGENET1K_V1")
    assert_same_backbone(new_head, state, skip_head=True)
    assert new_head.fc.out_features == 10 and new_head.fc.in_features == 512


def test_pretrained_weights_from_local_files(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.ckpt"
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    for path in (plain, wrapped):
        assert_same_backbone(build_backbone("resnet18", 1000, weights=str(path)), state, False)
    assert_same_backbone(build_backbone("resnet18", 5, weights=str(plain)), state, True)
    cifar = CifarResNet(20, num_classes=10).state_dict()
    torch.save(cifar, tmp_path / "cifar.pt")
    loaded = build_backbone("cifar_resnet20", 10, 3, weights=str(tmp_path / "cifar.pt"))
    assert_same_backbone(loaded, cifar, skip_head=False)
    with pytest.raises(ValueError, match="do not fit resnet50"):
        build_backbone("resnet50", 10, weights=str(plain))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth' is not a readable state dict"):
        build_backbone("resnet18", 10, weights=str(tmp_path / "junk.pth"))


@pytest.mark.parametrize(
    ("arch", "weights", "message"),
    [
        (
            "resnet50",
            "IMAGENET1K_V9",
            "'IMAGENET1K_V9' is neither a file nor a weights name of resnet50 "
            "\\(choose one of: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2\\)",
        ),
        ("cifar_resnet110", "IMAGENET1K_V1", "'cifar_resnet110' has no named weights"),
        ("resnet18", "missing/resnet18.pth", "weights file 'missing/resnet18.pth' does not exist"),
    ],
)
def test_bad_weights_fail_with_one_line(arch, weights, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(arch, 10, weights=weights)


def test_uncached_weights_without_network_name_the_cache_file(isolated_run, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match="resnet18-f37072fd.pth"):
        build_backbone("resnet18", 10, weights="IMAGENET1K_V1")


def make_module(**kwargs) -> NoisyClassifier:
    args = {"arch": "digits_cnn", "num_classes": 10, "mean": (0.3,), "std": (0.4,), "top_k": (1, 3)}
    return NoisyClassifier(**{**args, **kwargs})


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_noise_is_added_in_pixel_space_before_normalising():
    module = make_module(sigma=0.5)
    seen = []
    module.net[0].register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0]))
    x = torch.full((256, 1, 8, 8), 0.25)
    module.training_step((x, torch.zeros(256, dtype=torch.int64)), 0)
    noise = seen[0] - x  # what reached the normalisation layer, minus the clean pixels
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    first = seen[0].clone()
    module.training_step((x, torch.zeros(256, dtype=torch.int64)), 1)
    assert not torch.equal(first, seen[1])  # fresh noise for every batch


def test_module_attributes_hparams_and_default_recipe():
    module = make_module(sigma=0.12)
    assert module.sigma == 0.12 and module.num_classes == 10
    assert module.hparams.sigma == 0.12 and module.hparams.arch == "digits_cnn"
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (30, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": (10, 12)}, "model.top_k: no k below the number of classes c = 10"),
        ({"top_k": (0, 1)}, "model.top_k: k must be >= 1, got k = 0"),
        ({"arch": "vgg"}, "unknown model 'vgg'"),
        ({"sigma": 0}, r"^sigma must be a finite number > 0, got 0$"),
        ({"sigma": float("nan")}, r"^sigma must be a finite number > 0, got nan$"),
    ],
)
def test_bad_module_settings(kwargs, message):
    with pytest.raises(UsageError, match=message):
        make_module(**kwargs)


@pytest.mark.parametrize("sigma", ["0", "-0.25"])
def test_sigma_must_be_positive(sigma):
    args = ["--arch", "digits_cnn", "--num_classes", "10", "--mean", "[0.3]", "--std", "[0.4]"]
    with pytest.raises(ArgumentError) as error:
        parse_init(NoisyClassifier, *args, "--sigma", sigma)
    assert_names(" ".join(str(error.value).split()), "init.sigma", sigma)


def test_top_k_beyond_the_classes_is_dropped():
    """A data set with fewer classes than a config's top-k (fine-tuning on 3 classes with
    ``top_k: [1, 3, 5]``): the accuracies that cannot exist are dropped, and said so."""
    module = make_module(top_k=(1, 3, 10, 12))
    assert module.top_k == (1, 3) and module.dropped_top_k == (10, 12)
    assert sorted(module.val_metrics) == ["val/acc_top1", "val/acc_top3"]
