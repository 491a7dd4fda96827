"""The authors' count files (one row per example: c counts, then the label) and atomic writes."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from certify.math.validation import UsageError

INT64_MAX = np.iinfo(np.int64).max


def parse_counts(text: str, name: str = "counts") -> tuple[np.ndarray, np.ndarray]:
    """``(counts (B, c), labels (B,))`` from rows of c counts and a label; errors name the line."""
    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), 1) if line.split()]
    for no, tokens in lines:  # numpy would read a lone non-digit character as its code point
        if bad := next((t for t in tokens if not (t.isascii() and t.isdigit())), None):
            raise UsageError(f"{name}: line {no}: {bad[:40]!r} is not a non-negative integer")
        tokens[:] = [t.lstrip("0") or "0" for t in tokens]  # Python's int() takes <= 4300 digits
    if not lines:
        raise UsageError(f"{name}: no rows of counts (the file is empty)")
    width = len(lines[0][1])
    for no, tokens in lines:  # what np.loadtxt would refuse, named by line
        if len(tokens) != width:
            raise UsageError(f"{name}: line {no}: has {len(tokens)} columns, expected {width}")
        if big := next((t for t in tokens if len(t) > 19 or int(t) > INT64_MAX), None):
            raise UsageError(f"{name}: line {no}: {big[:40]} is too large")
    rows = [" ".join(tokens) for _, tokens in lines]
    table = np.loadtxt(rows, dtype=np.int64, ndmin=2, comments=None)  # (B, c + 1)
    if width < 3:
        raise UsageError(f"{name}: needs at least 2 counts and a label, got {width} values")
    counts, labels = table[:, :-1], table[:, -1]  # (B, c), (B,)
    totals = counts.astype(object).sum(axis=1)  # (B,) exact: int64 sums may overflow
    for row, (label, total) in enumerate(zip(labels, totals, strict=True)):
        where = f"{name}: line {lines[row][0]}"
        if label >= width - 1:
            raise UsageError(f"{where}: label {label} is outside 0..{width - 2}")
        if total == 0 or total > INT64_MAX:
            raise UsageError(
                f"{where}: {'all counts are 0' if total == 0 else 'the counts sum beyond int64'}"
            )
    return counts, labels


def read_counts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        reason = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory, not a "
                  "count file"}.get(type(err), f"cannot read ({err.strerror})")  # fmt: skip
        raise UsageError(f"{path}: {reason}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    if any(t.startswith("radius_top") for t in text.split("\n", 1)[0].split("\t")):
        raise UsageError(
            f"{path}: not a counts file, it looks like a certify.tsv (radius_top{{k}} columns); "
            f"`topk-smoothing report {path}` makes its tables"
        )
    return parse_counts(text, name=str(path))


def format_radius(value: float) -> str:
    """The shortest text that reads back as the same float; ``nan`` for an abstention."""
    return "nan" if math.isnan(value) else repr(float(value))


def format_counts(counts: np.ndarray, labels: np.ndarray) -> str:
    table = np.column_stack([counts, labels])  # (B, c + 1)
    return "".join(" ".join(map(str, row)) + "\n" for row in table.tolist())


def write_atomic(path: str | os.PathLike, chunks: Iterable[str | bytes]) -> None:
    """Write ``chunks`` via a temporary file and a rename, with the usual permissions."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as err:
        raise OSError(err.errno, f"cannot write there ({err.strerror})", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            for chunk in chunks:
                handle.write(chunk.encode() if isinstance(chunk, str) else chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write ({err.strerror})", str(path)) from None
        raise
