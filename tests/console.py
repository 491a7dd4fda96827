"""The console commands run as a user runs them (``python -m certify ...`` in a folder), and
their TSV outputs read back."""

import subprocess
import sys
from pathlib import Path


def run_command(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``topk-smoothing ARGS...`` in a fresh process in ``cwd``; output captured as text."""
    command = [sys.executable, "-m", "certify", *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


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
