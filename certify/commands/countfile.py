"""Reading and writing the authors' count files: one row per example, c counts then the label."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_INT = re.compile(r"[0-9]+")
_INT64_MAX = np.iinfo(np.int64).max


class CountFileError(ValueError):
    """A count file that cannot be used; the message names the file and the line."""


def parse_counts(text: str, name: str = "counts") -> tuple[np.ndarray, np.ndarray]:
    """Parse count-file text into ``(counts (B, c) int64, labels (B,) int64)``.

    Blank lines are skipped; every other line must hold the same number (>= 3) of
    non-negative ASCII integers, the last of which is a label in ``0..c-1``.

    Example:
        >>> counts, labels = parse_counts("5 90 5 1\\r\\n0 3 97 2\\n")
        >>> counts.tolist(), labels.tolist()
        ([[5, 90, 5], [0, 3, 97]], [1, 2])
    """
    rows: list[list[int]] = []
    width = None
    for line_no, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{name}: line {line_no}"
        for i, token in enumerate(tokens):
            if not _INT.fullmatch(token):
                raise CountFileError(f"{where}: {token[:40]!r} is not a non-negative integer")
            # Drop leading zeros and judge the length before int(): Python refuses strings of
            # more than 4300 digits with a plain ValueError, and int64 holds at most 19 digits.
            tokens[i] = token = token.lstrip("0") or "0"
            if len(token) > 19 or (len(token) == 19 and int(token) > _INT64_MAX):
                raise CountFileError(f"{where}: {token[:40]} is too large")
        if width is None:
            width = len(tokens)
            if width < 3:
                raise CountFileError(f"{where}: needs at least 2 counts and a label, got {line!r}")
        elif len(tokens) != width:
            raise CountFileError(f"{where}: has {len(tokens)} columns, expected {width}")
        values = [int(t) for t in tokens]
        if values[-1] >= width - 1:
            raise CountFileError(f"{where}: label {values[-1]} is outside 0..{width - 2}")
        if sum(values[:-1]) == 0:
            raise CountFileError(f"{where}: all counts are 0")
        if sum(values[:-1]) > _INT64_MAX:
            raise CountFileError(f"{where}: the counts' sum is too large")
        rows.append(values)
    if not rows:
        raise CountFileError(f"{name}: no rows of counts (the file is empty)")
    table = np.array(rows, dtype=np.int64)
    return table[:, :-1], table[:, -1]


def read_counts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a count file; every problem is a one-line :class:`CountFileError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CountFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CountFileError(f"{path}: is a directory, not a count file") from None
    except OSError as err:
        raise CountFileError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CountFileError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    return parse_counts(text, name=str(path))


def format_radius(value: float) -> str:
    """A radius as the shortest text that reads back as the same float (``repr``), so a table
    read from a TSV counts exactly what was computed; ``nan`` for an abstention.

    Example:
        >>> [format_radius(r) for r in (0.25, 1 / 3, float("inf"), float("nan"))]
        ['0.25', '0.3333333333333333', 'inf', 'nan']
    """
    return "nan" if math.isnan(value) else repr(float(value))


def format_counts(counts: np.ndarray, labels: np.ndarray) -> str:
    """Rows in the count-file format (inverse of :func:`parse_counts`)."""
    return "".join(
        " ".join(map(str, row)) + f" {label}\n"
        for row, label in zip(counts.tolist(), labels.tolist(), strict=True)
    )


def write_atomic(path: str | os.PathLike, chunks: Iterable[str]) -> None:
    """Write text to ``path`` through a temporary file and a rename: never a half file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as err:
        raise OSError(err.errno, f"cannot write there ({err.strerror})", str(path)) from None
    try:
        with os.fdopen(fd, "w", newline="\n") as handle:
            umask = os.umask(0o022)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the results from others
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write ({err.strerror})", str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
