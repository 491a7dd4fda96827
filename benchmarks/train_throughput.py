"""Training throughput: the project's ``fit`` against a plain PyTorch loop on the same work.

Both sides train the same network (``lightning_modules.models.build_network``, same seed) with
SGD (lr 0.1, momentum 0.9, weight decay 1e-4) on inputs plus fresh N(0, sigma^2) noise, from
the same DataLoader over generated data of the data set's shape, at the same precision and on
the same device. The fit is ``NoisyClassifier`` under a Lightning ``Trainer`` as users run it:
a logger (CSV, written to a temporary directory), checkpointing and the progress bar on.
Throughput is steady-state images per second between step ``--warmup`` and the last step
(the device is synchronised at both ends only). The table gives both and their ratio.

    python benchmarks/train_throughput.py                                   # digits CNN, CPU
    python benchmarks/train_throughput.py --device cuda --models cifar_resnet110 resnet50 \\
        --precision bf16-mixed --json train.json
    python benchmarks/train_throughput.py --device cuda --models resnet50 --channels-last

``--refresh-rate`` sets the progress bar's refresh rate of the fit: 20 as in the GPU configs;
Lightning's default, 1, reads the logged loss back from the device after every step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MODELS, machine  # noqa: E402

BATCH = {"digits_cnn": 64, "cifar_resnet20": 256, "cifar_resnet110": 256, "resnet50": 256}
SIGMA = 0.25


def make_loader(spec, batch: int, steps: int, device: torch.device, workers: int) -> DataLoader:
    """Generated inputs in [0, 1] of the data set's shape, ``steps`` batches in all."""
    generator = torch.Generator().manual_seed(0)
    count = min(batch * steps, max(batch * 4, 2048))  # distinct images, sampled with replacement
    images = torch.rand((count, *spec.shape), generator=generator)  # (N, C, H, W)
    labels = torch.randint(0, spec.num_classes, (count,), generator=generator)  # (N,)
    sampler = RandomSampler(range(count), replacement=True, num_samples=batch * steps)
    return DataLoader(
        TensorDataset(images, labels), batch_size=batch, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer_for(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)


def plain_loop(spec, loader, device, precision: str, channels_last: bool, warmup: int) -> float:
    """Images per second of a hand-written training loop."""
    from lightning_modules.models import build_network

    torch.manual_seed(0)
    net = build_network(spec.arch, spec.num_classes, *spec.norm).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = optimizer_for(net.parameters())
    autocast = (
        torch.autocast(device.type, torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    net.train()
    start, images = None, 0
    for step, (x, y) in enumerate(loader):
        if step == warmup:
            sync(device)
            start, images = time.perf_counter(), 0
        x = x.to(device, non_blocking=True)  # (B, C, H, W)
        y = y.to(device, non_blocking=True)  # (B,)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        noisy = x + SIGMA * torch.randn_like(x)
        with autocast:
            loss = F.cross_entropy(net(noisy), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        images += x.shape[0]
    sync(device)
    return images / (time.perf_counter() - start)


class StepTimer:
    """A Lightning callback: wall time from the start of step ``warmup`` to the last step."""

    def __init__(self, warmup: int, device: torch.device):
        import pytorch_lightning as pl

        class _Timer(pl.Callback):
            def on_train_batch_start(inner, trainer, pl_module, batch, batch_idx):  # noqa: N805
                if trainer.global_step == warmup:
                    sync(device)
                    self.start, self.images = time.perf_counter(), 0

            def on_train_batch_end(inner, trainer, pl_module, outputs, batch, batch_idx):  # noqa: N805
                self.images += batch[0].shape[0]

            def on_train_end(inner, trainer, pl_module):  # noqa: N805
                sync(device)
                self.seconds = time.perf_counter() - self.start

        self.callback = _Timer()
        self.start, self.images, self.seconds = None, 0, None


def lightning_fit(
    spec, loader, device, precision: str, channels_last: bool, warmup: int, refresh_rate: int
) -> float:
    """Images per second of the project's fit (``NoisyClassifier`` under a ``Trainer``)."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger

    from lightning_modules import NoisyClassifier

    torch.manual_seed(0)
    model = NoisyClassifier(
        spec.arch, spec.num_classes, *spec.norm, sigma=SIGMA, top_k=(1,),
        optimizer=optimizer_for, lr_scheduler=None, channels_last=channels_last,
    )  # fmt: skip
    timer = StepTimer(warmup, device)
    with tempfile.TemporaryDirectory() as folder:
        trainer = pl.Trainer(
            accelerator=device.type, devices=1, precision=precision, max_epochs=1,
            logger=CSVLogger(folder), default_root_dir=folder, enable_model_summary=False,
            callbacks=[timer.callback, ModelCheckpoint(dirpath=folder),
                       TQDMProgressBar(refresh_rate=refresh_rate)],
            num_sanity_val_steps=0,
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):
            trainer.fit(model, train_dataloaders=loader)
    return timer.images / timer.seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["digits_cnn"], choices=sorted(MODELS))
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-size", type=int, help="default: the configs' batch sizes")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternated")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--refresh-rate", type=int, default=20, help="fit's progress bar")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    device = torch.device(args.device)
    results = {"machine": machine(device), "settings": vars(args), "models": {}}
    print(f"{'model':<16} {'batch':>5} {'plain img/s':>12} {'fit img/s':>10} {'fit/plain':>9}")
    for name in args.models:
        spec = MODELS[name]
        batch = args.batch_size or BATCH[name]
        loader = make_loader(spec, batch, args.steps, device, args.workers)
        plain, fit = [], []
        for _ in range(args.rounds):  # alternated, so that a drifting machine hits both
            plain.append(plain_loop(spec, loader, device, args.precision,
                                    args.channels_last, args.warmup))  # fmt: skip
            fit.append(lightning_fit(spec, loader, device, args.precision, args.channels_last,
                                     args.warmup, args.refresh_rate))  # fmt: skip
        ratios = [f / p for f, p in zip(fit, plain, strict=True)]
        row = {"batch": batch, "plain": plain, "fit": fit, "ratio": statistics.median(ratios)}
        results["models"][name] = row
        print(
            f"{name:<16} {batch:>5} {max(plain):>12.0f} {max(fit):>10.0f} {row['ratio']:>9.3f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
