"""CertificationCallback: live certified top-k accuracy, in W&B, identical on 1 and 2 processes."""

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import wandb
import yaml

from certify import CertificationCallback
from certify.commands.cli import main as cli_main
from certify.math.validation import UsageError
from datamodules import DigitsDataModule
from lightning_modules import NoisyClassifier
from tests.wandb_records import history, metrics

REPO = Path(__file__).resolve().parents[1]
TOP_K, RADII = (1, 3, 5), (0.0, 0.25, 0.5)
KEYS = [f"val/certified_top{k}@{r:g}" for k in TOP_K for r in RADII] + [
    *(f"val/acr_top{k}" for k in TOP_K),
    "val/certify_seconds",
]


def small_config(directory: Path, logger: dict | None = None, **callback) -> Path:
    """configs/digits.yaml with a cheap certification and few epochs."""
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["trainer"]["enable_progress_bar"] = False
    config["test_after_fit"] = False
    for entry in config["trainer"]["callbacks"]:
        if entry["class_path"] == "certify.CertificationCallback":
            entry["init_args"].update(
                {
                    "n": 200,
                    "num_examples": 41,
                    "every_n_epochs": 1,
                    "radii": list(RADII),
                    **callback,
                }
            )
    if logger is not None:
        config["trainer"]["logger"] = logger
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def digits_fit(tmp_path_factory):
    """One short digits run through the real CLI, W&B offline (module-scoped)."""
    directory = tmp_path_factory.mktemp("digits_fit")
    config = small_config(directory)
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        assert cli_main(["fit", "--config", str(config)]) == 0
    finally:
        wandb.finish()  # flush the offline run file, as the end of a process does
        wandb.teardown()  # forget this directory: the next run in this process starts afresh
        os.chdir(cwd)
    return directory


def test_every_certified_epoch_reaches_wandb(digits_fit):
    """Per evaluation, the scalars and the table (epoch, k, accuracy per radius, ACR) on one row
    (one ``trainer/global_step``), both kept; dotted keys defined against that step, escaped."""
    (run_file,) = digits_fit.glob("runs/wandb/offline-run-*/run-*.wandb")
    rows = [row for row in history(run_file) if "val/certified_top1@0" in row]
    assert len(rows) == 2  # one per epoch
    files = run_file.parent / "files"
    for epoch, row in enumerate(rows):
        for key in KEYS:
            assert key in row and math.isfinite(row[key]), key
            assert 0 <= row[key] <= (math.inf if "seconds" in key or "acr" in key else 1)
        # certified accuracy can only fall with the radius and rise with k
        for k in TOP_K:
            values = [row[f"val/certified_top{k}@{r:g}"] for r in RADII]
            assert values == sorted(values, reverse=True)
        assert row["val/certified_top1@0"] <= row["val/certified_top3@0"]
        assert row["epoch"] == epoch and "trainer/global_step" in row
        table = json.loads((files / row["val/certified_table/path"]).read_text())  # this epoch's
        assert table["columns"] == ["epoch", "k", *(f"r={r:g}" for r in RADII), "acr"]
        assert [line[:2] for line in table["data"]] == [[epoch, k] for k in TOP_K]
        for _, k, *accuracy, acr in table["data"]:  # float64 there, float32 in the scalars
            assert accuracy == pytest.approx([row[f"val/certified_top{k}@{r:g}"] for r in RADII])
            assert acr == pytest.approx(row[f"val/acr_top{k}"])
    assert rows[0]["trainer/global_step"] < rows[1]["trainer/global_step"]
    defined = metrics(run_file)
    assert all(defined[k.replace(".", "\\.")] == "trainer/global_step" for k in KEYS if "." in k)


def test_fit_reports_the_share_of_time_spent_certifying(digits_fit):
    (run_file,) = digits_fit.glob("runs/wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    (fit,) = [row for row in rows if "fit/certify_share" in row]
    certified = sum(row["val/certify_seconds"] for row in rows if "val/certify_seconds" in row)
    assert fit["fit/certify_seconds"] == pytest.approx(certified, rel=1e-6)  # the same runs
    assert 0 < fit["fit/certify_seconds"] < fit["fit/seconds"]
    assert fit["fit/certify_share"] == pytest.approx(
        fit["fit/certify_seconds"] / fit["fit/seconds"]
    )


def _read_csv_metrics(directory: Path) -> dict:
    (path,) = directory.glob("**/metrics.csv")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    merged = {}
    for row in rows:
        merged.update({k: v for k, v in row.items() if v not in ("", None)})
    return {k: v for k, v in merged.items() if k.startswith("val/c") or k.startswith("val/acr")}


@pytest.mark.ddp
def test_validate_is_bit_identical_on_one_and_two_processes(
    digits_fit, tmp_path, monkeypatch, capsys
):
    """``validate`` in this process, then on 2 DDP processes (a subprocess: Lightning launches
    the second process by running the command again): the same numbers and printed table."""
    (ckpt,) = digits_fit.glob("runs/**/checkpoints/last.ckpt")
    monkeypatch.chdir(tmp_path)
    results, tables = [], []
    for devices in (1, 2):
        logger = {
            "class_path": "pytorch_lightning.loggers.CSVLogger",
            "init_args": {"save_dir": f"csv{devices}", "name": "validate"},
        }
        config = small_config(tmp_path, logger=logger, n=128, num_examples=45, batch_size=512)
        args = ["validate", "--config", str(config), "--ckpt_path", str(ckpt)]
        args += ["--trainer.devices", str(devices)]
        if devices == 1:
            assert cli_main(args) == 0
            out = capsys.readouterr().out
        else:
            command = [sys.executable, "-m", "certify", *args, "--trainer.strategy", "ddp"]
            run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            out = run.stdout
        results.append(_read_csv_metrics(tmp_path / f"csv{devices}"))
        tables.append([line for line in out.splitlines() if line.startswith("| top-")])
    assert set(results[0]) >= set(KEYS) - {"val/certify_seconds"}
    certified = {k: v for k, v in results[0].items() if k != "val/certify_seconds"}
    assert certified == {k: v for k, v in results[1].items() if k != "val/certify_seconds"}
    assert len(tables[0]) == 3 and tables[1] == tables[0]  # the printed table: all 45 examples


class TestFailsEarly:
    def trainer(self, callback):
        return pl.Trainer(
            callbacks=[callback], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, max_epochs=1, limit_train_batches=1,
        )  # fmt: skip

    def model_and_data(self):
        data = DigitsDataModule(batch_size=64)
        model = NoisyClassifier("digits_cnn", data.num_classes, data.mean, data.std, sigma=0.25)
        return model, data

    def test_k_not_below_num_classes(self):
        model, data = self.model_and_data()
        with pytest.raises(UsageError, match="1 <= k < c = 10"):
            self.trainer(CertificationCallback(top_k=[1, 10], n=10)).validate(model, data)

    def test_no_validation_data(self):
        model, data = self.model_and_data()
        data.val_dataloader = lambda: None
        with pytest.raises(UsageError, match="no validation data"):
            self.trainer(CertificationCallback(n=10)).fit(model, data)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"n": 0}, "n must be"),
            ({"alpha": 0}, "alpha"),
            ({"every_n_epochs": 0}, "every_n"),
            ({"autocast": "fp8"}, "autocast must be 'bf16' or 'fp16', got 'fp8'"),
        ],
    )
    def test_impossible_settings(self, kwargs, match):
        with pytest.raises(UsageError, match=match):
            CertificationCallback(**kwargs)

    def test_default_top_k_is_capped_below_num_classes(self):
        callback = CertificationCallback(n=5, num_examples=3)
        data = DigitsDataModule(batch_size=64)
        model = NoisyClassifier("digits_cnn", 10, data.mean, data.std, sigma=0.25)
        self.trainer(callback).validate(model, data)
        assert callback.top_k == (1, 3, 5) and len(callback.indices) == 3


def test_autocast_reaches_the_samplers_forward_passes_only():
    """``autocast="bf16"``: certification runs the network under bf16 autocast, the
    validation pass itself does not."""
    data = DigitsDataModule(batch_size=64)
    model = NoisyClassifier("digits_cnn", data.num_classes, data.mean, data.std, sigma=0.25)
    seen = set()

    def record(module, inputs):
        enabled = torch.is_autocast_enabled("cpu")
        seen.add((enabled, torch.get_autocast_dtype("cpu") if enabled else None))

    model.net.register_forward_pre_hook(record)
    callback = CertificationCallback(n=50, num_examples=3, batch_size=64, autocast="bf16")
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.validate(model, data)
    assert seen == {(False, None), (True, torch.bfloat16)}


def test_callback_noise_is_never_the_noise_certify_uses(digits_checkpoint):
    """For the same seed and examples, the callback samples the "validation" streams: its
    numbers are those of ``certify(..., purpose="validation")`` and not of the streams that
    ``topk-smoothing certify`` uses, so choosing a checkpoint by them does not reuse the
    final certificate's noise."""
    from certify import CertifiedTopKAccuracy, SmoothedClassifier, certified_radius

    model = NoisyClassifier.load_from_checkpoint(digits_checkpoint, weights=None)
    data = DigitsDataModule(batch_size=64)
    callback = CertificationCallback(top_k=[1, 3], n=300, num_examples=20, seed=7, batch_size=600)
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.validate(model, data)
    live_accuracy, live_acr, _ = callback.last_table  # (K, R), (K,) float64

    items = [data.val_dataset[int(i)] for i in callback.indices]
    x = torch.stack([image for image, _ in items])  # (20, 1, 8, 8)
    labels = torch.tensor([label for _, label in items])  # (20,)
    smoothed = SmoothedClassifier(model.net, 10, model.sigma)
    common = dict(batch_size=600, seed=7, example_ids=callback.indices.tolist())
    radii = smoothed.certify(x, labels, (1, 3), 300, 0.001, purpose="validation", **common)
    metric = CertifiedTopKAccuracy((1, 3), callback.radii)
    metric.update(radii)  # (20, 2)
    accuracy, acr = metric.compute_table()
    assert (accuracy.numpy() == live_accuracy).all() and (acr.numpy() == live_acr).all()
    counts = {
        p: smoothed.sample_counts(x, 300, purpose=p, **common) for p in ("validation", "certify")
    }
    assert not torch.equal(counts["validation"], counts["certify"])  # other noise, other counts
    other = certified_radius(counts["certify"], labels, (1, 3), model.sigma, 0.001)  # (20, 2)
    assert float(np.nan_to_num(other[:, 0].numpy()).mean()) != live_acr[0]


def test_the_share_line_counts_only_epochs_this_fit_ran(tmp_path, capsys):
    """A fit resumed from the checkpoint of a finished run runs no epoch: no share line (it
    would divide nothing by the run's earlier epochs)."""
    data = DigitsDataModule(batch_size=64)

    def fit(ckpt_path=None) -> str:
        model = NoisyClassifier("digits_cnn", data.num_classes, data.mean, data.std, sigma=0.25)
        callback = CertificationCallback(n=50, num_examples=3, batch_size=64)
        trainer = pl.Trainer(
            callbacks=[callback], logger=False, default_root_dir=tmp_path, max_epochs=1,
            limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1,
        )  # fmt: skip
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return capsys.readouterr().out

    first = fit()
    assert "Certification took" in first and first.rstrip().endswith("on average over 1 epoch")
    (last,) = tmp_path.glob("**/checkpoints/*.ckpt")
    assert "Certification took" not in fit(last)


def test_no_sync_dist_warning_under_ddp(isolated_run):
    """Lightning warns under DDP (on one process as on several) of epoch-level values logged
    without ``sync_dist=True``; the callback's, summed over the processes already, are synced."""
    from pytorch_lightning.trainer.connectors.logger_connector.result import warning_cache

    data = DigitsDataModule(batch_size=64)
    model = NoisyClassifier("digits_cnn", data.num_classes, data.mean, data.std, sigma=0.25)
    callback = CertificationCallback(n=50, num_examples=3, batch_size=64, sequential=True)
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        accelerator="cpu", devices=1, strategy="ddp", limit_val_batches=1,
    )  # fmt: skip
    warning_cache.clear()  # each message is shown once per process
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.validate(model, data)
    finally:
        torch.distributed.destroy_process_group()
    assert (logged := {*KEYS, "val/certify_samples"}) <= set(trainer.callback_metrics)
    unsynced = [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
    assert not [m for m in unsynced if any(repr(key) in m for key in logged)], unsynced
