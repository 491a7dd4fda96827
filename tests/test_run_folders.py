"""Where the console commands write, and what they print around it: a fit its own folder (with
or without a logger) and one closing line naming it; certify and predict their output
directory only; W&B offline without an account; no warnings about our own settings."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from tests.console import DIGITS, QUIET, console
from tests.wandb_records import _raw_records

REPO = Path(__file__).resolve().parents[1]
#: A short digits fit: one or two batches per epoch, a cheap live certification.
SHORT = [
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.callbacks.init_args.n", "100",  # the last callback: certification
    "--trainer.callbacks.init_args.num_examples", "10",
]  # fmt: skip


def closing_line(stdout: str) -> tuple[Path, Path]:
    """The run folder and best checkpoint of a fit's last line."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("topk-smoothing fit: run folder "), stdout[-2000:]
    folder, best = last.removeprefix("topk-smoothing fit: run folder ").split("; best checkpoint ")
    return Path(folder), Path(best)


def fit_in_a_process(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``topk-smoothing fit`` in a fresh process in ``tmp_path``: W&B's mode left to the config,
    no API key anywhere (environment, netrc, settings) and a closed local port as its server."""
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(
        PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HOME=str(home), NETRC=str(home / "netrc"),
        WANDB_CONFIG_DIR=str(home / "wandb"), WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_DATA_DIR=str(home / "data"), WANDB_BASE_URL="http://127.0.0.1:9",
        TORCH_HOME=str(home / "torch"),
    )  # fmt: skip
    command = [sys.executable, "-m", "certify", "fit", "--config", DIGITS, *SHORT, *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_the_main_command_prints_no_warning_about_our_settings(tmp_path):
    """The shipped digits fit (W&B offline by its config): no W&B warning, no deprecation notice
    of a library, W&B's log of the run without a traceback, and a closing line naming the run's
    folder and best checkpoint."""
    done = fit_in_a_process(tmp_path, "--trainer.max_epochs", "2", "--test_after_fit", "false")
    for needle in ("wandb: WARNING", "git root", "DeprecationWarning", "FutureWarning",
                   "deprecated", "Traceback"):  # fmt: skip
        assert needle not in done.stderr, (needle, done.stderr[-3000:])
    folder, best = closing_line(done.stdout)
    assert folder.parent == Path("runs", "topk-smoothing-digits")
    assert best.parent == folder / "checkpoints" and (tmp_path / best).is_file()
    (log,) = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{folder.name}/logs/debug.log")
    assert "run started" in log.read_text()
    assert "Traceback" not in log.read_text() and "HandleAbandonedError" not in log.read_text()


@pytest.mark.slow
def test_an_online_logger_without_an_api_key_logs_offline_and_says_so(tmp_path):
    """``offline: false`` and no ``wandb login``: one note before training, an offline run, no
    network (W&B's server is a closed local port) and exit status 0."""
    done = fit_in_a_process(tmp_path, "--trainer.logger.offline", "false",
                          "--trainer.max_epochs", "1", "--test_after_fit", "false")  # fmt: skip
    notes = [line for line in done.stderr.splitlines() if "W&B API key" in line]
    assert notes == [
        "topk-smoothing fit: note: no W&B API key (`wandb login`): logging offline; upload "
        "later with `wandb sync runs/wandb/offline-run-*`"
    ]
    assert done.stderr.index(notes[0]) < done.stderr.index("wandb: Tracking run")
    folder, _ = closing_line(done.stdout)
    assert list((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{folder.name}/run-*.wandb"))
    saved = (tmp_path / folder / "config.yaml").read_text()  # as given: online after a login
    assert "offline: false" in saved and "mode: offline" not in saved


def test_fits_without_a_logger_get_a_folder_each_and_a_resumed_fit_keeps_its_own(isolated_run):
    """Two logger-less fits: two folders under ``runs/``, each with its config and checkpoints,
    both named by the fit's closing line; resuming the first continues in its folder."""
    args = ["fit", "--config", DIGITS, *SHORT, *QUIET, "--test_after_fit", "false"]
    folders = []
    for _ in range(2):
        code, out, err = console(*args, "--trainer.max_epochs", "1")
        assert code == 0, err[-3000:]
        folder, best = closing_line(out)
        assert folder.parent == Path("runs") and folder.name.startswith("fit-")
        assert best == folder / "checkpoints" / "best-epoch000.ckpt" and best.is_file()
        assert (folder / "config.yaml").is_file()
        folders.append(folder)
    assert sorted(Path("runs").iterdir()) == sorted(folders)  # nothing else, nothing shared

    last = folders[0] / "checkpoints" / "last.ckpt"
    code, out, err = console(*args, "--trainer.max_epochs", "2", "--ckpt_path", last)
    assert code == 0, err[-3000:]
    assert closing_line(out)[0] == folders[0]
    assert sorted(Path("runs").iterdir()) == sorted(folders)
    assert torch.load(last, weights_only=True)["epoch"] == 1

    os.utime(folders[1])  # Lightning's keyword `last`: the latest fit continues, in its folder
    code, out, err = console(*args, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert closing_line(out)[0] == folders[1]
    assert sorted(Path("runs").iterdir()) == sorted(folders)
    assert torch.load(folders[1] / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1

    before = sorted(Path("runs").rglob("*"))  # validate and test: they write nothing, and the
    for command in ("validate", "test"):  # checkpoint's callbacks restore without a warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, _, err = console(command, "--config", DIGITS, *QUIET, "--ckpt_path", last)
        assert code == 0, err[-3000:]
        about = [str(w.message) for w in caught if "ckpt_path" in str(w.message)
                 or "dirpath" in str(w.message)]  # fmt: skip
        assert not about, about
    assert sorted(Path("runs").rglob("*")) == before


def test_certify_and_predict_write_their_output_directory_and_one_named_wandb_run(
    isolated_run, digits_checkpoint
):
    """With the digits config (a W&B logger): no run folder of the training project; one W&B
    run, certify's (it logs its report), named for the command and its output directory."""
    common = ["--config", DIGITS, "--ckpt_path", digits_checkpoint, "--max_examples", "4",
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    for command, sizes in (("certify", ["--n", "100"]), ("predict", ["--n0", "20", "--n", "50"])):
        code, _, err = console(command, *common, *sizes)
        assert code == 0, err[-3000:]
    assert sorted(p.name for p in Path("runs").iterdir()) == ["certify", "predict", "wandb"]
    (certified,) = Path("runs", "certify").iterdir()
    assert len(list(Path("runs", "predict").iterdir())) == 1
    assert wandb_runs() == [(f"certify {certified.name}", "certify")]

    (certified / "certify.tsv").unlink()  # a rerun that only merges the finished examples
    code, out, err = console("certify", *common, "--n", "100")
    assert code == 0 and "already in" in out, err[-3000:]
    assert wandb_runs() == [(f"certify {certified.name}", "certify")] * 2  # its report too


def wandb_runs() -> list[tuple[str, str]]:
    """(name, job type) of each W&B run under ``runs/wandb`` that logged a history row."""
    runs = []
    for run_file in sorted(Path("runs", "wandb").glob("offline-run-*/run-*.wandb")):
        kinds, name = set(), None
        for raw in _raw_records(run_file.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            kinds.add(kind := record.WhichOneof("record_type"))
            if kind == "run":
                name = (record.run.display_name, record.run.job_type)
        if "history" in kinds:
            runs.append(name)
    return runs
