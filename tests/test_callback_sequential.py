"""CertificationCallback(sequential=True): live certification from fewer samples."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from certify import CertificationCallback, SmoothedClassifier
from certify.math.validation import UsageError
from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier

TOP_K, RADII, N_MAX = (1, 3), (0.0, 0.25, 0.5, 0.75), 3000


def test_sequential_validation_logs_what_the_api_certifies(digits_checkpoint):
    """The logged certified accuracy at each radius is that of
    ``SmoothedClassifier.certify_sequential`` on the same validation examples and streams;
    ``val/certify_samples`` is their mean number of samples, below n."""
    model = NoisyClassifier.load_from_checkpoint(digits_checkpoint, map_location="cpu")
    data = DigitsDataModule(batch_size=64)
    callback = CertificationCallback(
        top_k=TOP_K, radii=RADII, n=N_MAX, alpha=0.01, num_examples=12, seed=3,
        examples_per_call=10, sequential=True, batch_size=1000,
    )  # fmt: skip
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.validate(model, data)
    logged = trainer.callback_metrics

    data.setup("validate")
    indices = callback.indices.tolist()
    x = torch.stack([data.val_dataset[i][0] for i in indices])  # (12, 1, 8, 8)
    labels = torch.tensor([int(data.val_dataset[i][1]) for i in indices])
    smoothed = SmoothedClassifier(model.net.eval(), 10, 0.25)
    cert = smoothed.certify_sequential(
        x,
        labels,
        TOP_K,
        RADII,
        N_MAX,
        0.01,
        batch_size=1000,
        seed=3,
        example_ids=indices,
        purpose="validation",
    )
    radius = np.nan_to_num(cert.radius.numpy(), nan=-1.0)  # (12, K)
    for j, k in enumerate(TOP_K):
        for r in RADII:
            expected = float((radius[:, j] >= r).mean())
            assert float(logged[f"val/certified_top{k}@{r:g}"]) == pytest.approx(expected)
    mean = float(cert.samples.double().mean())
    assert float(logged["val/certify_samples"]) == pytest.approx(mean)
    assert mean < N_MAX and float(logged["val/certified_top3@0.25"]) > 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bounds": "binocp"}, "sequential certification bounds with simuem"),
        ({"radii": (0.25, 0.25)}, "radii must be distinct"),
        ({"radii": (0.25, float("inf"))}, "radii must be finite numbers >= 0"),
    ],
)
def test_impossible_sequential_settings(kwargs, match):
    with pytest.raises(UsageError, match=match):
        CertificationCallback(sequential=True, **kwargs)
