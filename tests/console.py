"""The console commands as a user runs them, in this process (``main(argv)``) or in a fresh
one (``python -m certify ...``), and their TSV outputs read back."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

#: The tests pytest will run (``conftest.pytest_collection_modifyitems`` keeps them here).
SELECTED = pytest.StashKey[list]()

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


def console(*args) -> tuple[int, str, str]:
    """``topk-smoothing ARGS...`` in this process: exit status, stdout and stderr."""
    from certify.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def start_command(request, cwd: Path, *args) -> subprocess.Popen | None:
    """``topk-smoothing ARGS...`` started in a fresh process in ``cwd`` (output captured as
    text), for a ``ddp`` test of ``request``'s module: it runs while the module's other tests
    run here. None when no such test is selected."""
    selected = request.config.stash[SELECTED]
    if not any(i.module is request.module and i.get_closest_marker("ddp") for i in selected):
        return None
    command = [sys.executable, "-m", "certify", *map(str, args)]
    return subprocess.Popen(
        command, cwd=cwd, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def assert_one_line_error(result: tuple[int, str, str], command: str, *needles: str) -> str:
    """Exit status 2 and one line ``topk-smoothing COMMAND: error: ...`` naming ``needles``."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"topk-smoothing {command}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def read_rows(path: Path) -> list[list[str]]:
    """``certify.tsv`` or ``predict.tsv``, header included, without the wall-clock ``seconds``
    column (the one column that differs between equal runs)."""
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    assert rows[0][-1] == "seconds"
    return [row[:-1] for row in rows]


def interrupted_copy(run: Path, partial: Path, settings: str, rows: int, cut: int) -> None:
    """``partial``: what a run killed after ``rows`` rows leaves, from the finished ``run``:
    its settings file and its first rows of ``parts/rank0.tsv``, the next one torn after
    ``cut`` characters."""
    (partial / "parts").mkdir(parents=True, exist_ok=True)
    (partial / settings).write_bytes((run / settings).read_bytes())
    lines = (run / "parts" / "rank0.tsv").read_text().splitlines(keepends=True)
    (partial / "parts" / "rank0.tsv").write_text("".join(lines[:rows]) + lines[rows][:cut])


def trainer_and_model(ckpt: Path):
    """``(CertifyingTrainer on the CPU, NoisyClassifier of ckpt)``: the commands' methods
    called directly, without the console's parsing."""
    from certify.commands.runner import CertifyingTrainer
    from lightning_modules import NoisyClassifier

    trainer = CertifyingTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    return trainer, NoisyClassifier.load_from_checkpoint(ckpt, weights=None)
