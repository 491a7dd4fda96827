"""Every shipped config parses and instantiates (model, data, trainer), alone and under DDP."""

from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.strategies import DDPStrategy

from certify import CertificationCallback
from lightning_modules import NoisyClassifier, NormalizeLayer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(path.name for path in CONFIGS.glob("*.yaml"))
DDP_ON_CPU = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2"]


@pytest.fixture
def config_args(cifar10_root, imagenet_root, seed_torch_hub):
    """``args(name)``: the arguments that build config ``name`` on this machine's test data."""

    def args(name: str) -> list[str]:
        cifar = ["--data.data_dir", str(cifar10_root[0]), "--data.verify_md5", "false"]
        imagenet = ["--data.data_dir", str(imagenet_root)]
        extra = {
            "digits.yaml": [],
            "digits_consistency.yaml": [],
            "digits_smoothadv.yaml": [],
            "cifar10_resnet110.yaml": cifar,
            "cifar10_resnet110_consistency.yaml": cifar,
            "cifar10_resnet110_smoothadv.yaml": cifar,
            "imagenet_resnet50.yaml": imagenet,
            "imagenet_resnet50_finetune.yaml": imagenet,
            "ddp.yaml": ["--trainer.accelerator", "cpu", "--trainer.devices", "2"],
        }
        assert name in extra, f"configs/{name} is shipped but not tested: add it here"
        if name == "imagenet_resnet50_finetune.yaml":
            seed_torch_hub("resnet50", "IMAGENET1K_V2")
        configs = [CONFIGS / name]
        if name == "ddp.yaml":  # a trainer-only config, given after a model config
            configs.insert(0, CONFIGS / "digits.yaml")
        return [arg for path in configs for arg in ("--config", str(path))] + extra[name]

    return args


def check_common(cli) -> None:
    model, data = cli.model, cli.datamodule
    assert isinstance(model, NoisyClassifier) and model.num_classes == data.num_classes
    assert isinstance(model.net[0], NormalizeLayer)
    assert model.net[0].mean.flatten().tolist() == pytest.approx(list(data.mean))
    assert model.net[0].std.flatten().tolist() == pytest.approx(list(data.std))
    assert model.hparams.num_classes == data.num_classes
    assert isinstance(cli.trainer.logger, WandbLogger)
    checkpoints = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert [cb.monitor for cb in checkpoints] == ["val/acc_top1", None]  # best and latest
    assert cli.trainer.checkpoint_callback.mode == "max"
    (live,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, CertificationCallback)]
    assert live.num_examples is not None and live.n <= 1000  # cheap enough to run while training
    live.check_module(model)  # its k values fit the model's classes


#: Under DDP too, but for the loss variants: they differ from their base config in the loss alone
#: (test_digits_variants_keep_the_digits_recipe; the CIFAR-10 ones in their recipes below).
BUILDS = [(name, False) for name in SHIPPED] + [
    (name, True) for name in SHIPPED if not name.endswith(("_consistency.yaml", "_smoothadv.yaml"))
]


@pytest.mark.parametrize(
    ("name", "ddp"), BUILDS, ids=[f"{n}-{'ddp' if d else 'plain'}" for n, d in BUILDS]
)
def test_config_builds(isolated_run, lightning_cli, config_args, name, ddp):
    cli = lightning_cli(*config_args(name), *(DDP_ON_CPU if ddp else []), run=False)
    check_common(cli)
    if ddp or name == "ddp.yaml":
        assert isinstance(cli.trainer.strategy, DDPStrategy) and cli.trainer.num_devices == 2


def published_recipe(model: NoisyClassifier, epochs: int, max_epochs: int, step: int = 30) -> None:
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert (scheduler.step_size, scheduler.gamma, max_epochs) == (step, 0.1, epochs)


@pytest.mark.parametrize("sigma", ["0.12", "1.0"])  # the smallest and largest published
def test_cifar10_resnet110_recipe_and_sigma_override(
    isolated_run, lightning_cli, config_args, sigma
):
    cli = lightning_cli(*config_args("cifar10_resnet110.yaml"), "--model.sigma", sigma, run=False)
    assert cli.model.sigma == float(sigma) and cli.model.hparams.sigma == float(sigma)
    assert len(cli.model.net[1].layer1) == 18  # ResNet-110
    published_recipe(cli.model, 90, cli.trainer.max_epochs)


def test_imagenet_configs(isolated_run, lightning_cli, config_args):
    scratch = lightning_cli(*config_args("imagenet_resnet50.yaml"), run=False)
    published_recipe(scratch.model, 90, scratch.trainer.max_epochs)
    assert scratch.model.num_classes == 6 and scratch.model.net[1].fc.out_features == 6

    tuned = lightning_cli(*config_args("imagenet_resnet50_finetune.yaml"), run=False)
    seeded = torch.load("torch-home/hub/checkpoints/resnet50-11ad3fa6.pth", weights_only=True)
    backbone = tuned.model.net[1].state_dict()
    assert all(torch.equal(backbone[k], v) for k, v in seeded.items() if not k.startswith("fc."))
    assert tuned.model.net[1].fc.out_features == 6  # a new head for the 6 classes of the data
    assert tuned.model.hparams.weights == "IMAGENET1K_V2"


@pytest.mark.parametrize(("sigma", "lam"), [("0.25", 20.0), ("0.5", 10.0), ("1.0", 10.0)])
def test_cifar10_consistency_recipe(isolated_run, lightning_cli, config_args, sigma, lam):
    """Jeong & Shin: m = 2, eta = 0.5, lambda by sigma, 150 epochs, LR x 0.1 every 50, batches
    of 256 split into 2 steps of 128 images x 2 copies."""
    args = config_args("cifar10_resnet110_consistency.yaml")
    cli = lightning_cli(*args, "--model.sigma", sigma, run=False)
    settings = cli.model.loss_settings
    assert cli.model.loss == "consistency" and cli.model.hparams.consistency_lambda == lam
    assert (settings["num_noise_samples"], settings["consistency_eta"]) == (2, 0.5)
    assert cli.datamodule.batch_size * settings["num_noise_samples"] == 256
    assert len(cli.model.net[1].layer1) == 18  # ResNet-110
    published_recipe(cli.model, 150, cli.trainer.max_epochs, step=50)


def test_cifar10_smoothadv_recipe(isolated_run, lightning_cli, config_args):
    cli = lightning_cli(*config_args("cifar10_resnet110_smoothadv.yaml"), run=False)
    settings = cli.model.loss_settings
    assert cli.model.loss == "smoothadv" and cli.model.sigma == 0.5
    assert settings == {
        "num_noise_samples": 2, "consistency_lambda": None, "consistency_eta": None,
        "smoothadv_epsilon": 2.0, "smoothadv_steps": 10, "smoothadv_warmup_epochs": 10,
    }  # fmt: skip
    assert cli.datamodule.batch_size * settings["num_noise_samples"] == 256
    published_recipe(cli.model, 150, cli.trainer.max_epochs, step=50)


@pytest.mark.parametrize("loss", ["consistency", "smoothadv"])
def test_digits_variants_keep_the_digits_recipe(isolated_run, lightning_cli, config_args, loss):
    """The same data, network, optimizer, schedule, epochs and callbacks as digits.yaml; only
    the loss and its settings differ."""
    import yaml

    base = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    variant = yaml.safe_load((CONFIGS / f"digits_{loss}.yaml").read_text())
    extra = set(variant["model"]["init_args"]) - set(base["model"]["init_args"])
    assert {key: variant["model"]["init_args"].pop(key) for key in extra}["loss"] == loss
    assert variant == base
    cli = lightning_cli(*config_args(f"digits_{loss}.yaml"), run=False)
    assert cli.model.loss == loss and cli.model.loss_settings["num_noise_samples"] == 2


@pytest.mark.parametrize(("override", "monitors"), [([], 1), (["--trainer.logger", "false"], 0)])
def test_a_learning_rate_monitor_needs_a_logger(
    isolated_run, lightning_cli, config_args, override, monitors
):
    """Without a logger the config's LearningRateMonitor is left out (it would stop the fit)."""
    cli = lightning_cli(*config_args("cifar10_resnet110.yaml"), *override, run=False)
    assert sum(isinstance(cb, LearningRateMonitor) for cb in cli.trainer.callbacks) == monitors
