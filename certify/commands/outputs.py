"""The output directory of ``topk-smoothing certify``: crash-safe, resumable, mergeable.

Every process appends one line per finished example to its own part file
(``parts/rank{r}.tsv``) with a single ``write`` followed by ``fsync``, so a kill loses at most
the examples in flight and never leaves a half row that is read back: a last line without its
newline is cut off before the file is appended to again. ``certify.json`` records everything
that determines the results; a rerun with other settings is refused. When every selected
example is done, the parts are merged, sorted by dataset index, into ``certify.tsv`` and the
authors' ``counts.txt`` format (both written through a temporary file and a rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from certify.commands.countfile import format_counts, format_radius, write_atomic

METADATA = "certify.json"
PREDICT_METADATA = "predict.json"
#: the settings files of the commands that write parts/: one command per directory
SETTINGS_FILES = frozenset({METADATA, PREDICT_METADATA})
RESULTS = "certify.tsv"
COUNTS = "counts.txt"


class OutputError(ValueError):
    """The output directory cannot be used for this run (one-line message)."""


#: Datamodule arguments that change how data is loaded, not which examples it holds.
LOADER_ONLY = ("batch_size", "num_workers", "download", "verify_md5")


def data_identity(datamodule) -> dict:
    """The datamodule's class and the arguments that decide its examples (for ``certify.json``):
    a rerun on another split seed or data directory must not resume this run's rows."""
    kind = type(datamodule)
    hparams = dict(getattr(datamodule, "hparams", {}))
    identity = {"class": f"{kind.__module__}.{kind.__qualname__}"}
    identity.update({k: v for k, v in sorted(hparams.items()) if k not in LOADER_ONLY})
    return json.loads(json.dumps(identity, default=str))  # as it reads back from the file


class CertifyOutput:
    """One certify run's output directory.

    Args:
        directory: where the files go (created if missing).
        metadata: settings that determine the results (n, alpha, sigma, ...).
        top_k: the k of the radius columns.
    """

    metadata_file = METADATA  #: the settings file's name

    def __init__(self, directory: str | os.PathLike, metadata: dict, top_k: Sequence[int]) -> None:
        self.directory = Path(directory)
        self.metadata = dict(metadata)
        self.top_k = tuple(top_k)
        #: a ``--sequential`` run: a ``samples`` column, no ``counts.txt``
        self.sequential = self.metadata.get("mode") == "sequential"
        self.header = [
            "idx", "label", *(f"pred{i + 1}" for i in range(max(self.top_k))),
            *(f"radius_top{k}" for k in self.top_k), *(["samples"] * self.sequential), "seconds",
        ]  # fmt: skip

    # ------------------------------------------------------------------ settings
    def prepare(self) -> None:
        """Create the directory and ``certify.json``, or refuse settings that differ."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "parts").mkdir(exist_ok=True)
        except OSError as err:
            where = err.filename or self.directory
            raise OutputError(f"cannot create output directory {where}: {err.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise OutputError(f"output directory {self.directory} is not writable")
        for other in sorted(SETTINGS_FILES - {self.metadata_file}):
            if (self.directory / other).is_file():  # the parts of another command's rows
                raise OutputError(
                    f"{self.directory} holds a {Path(other).stem} run ({other}); refusing to "
                    "mix them (choose another output directory)"
                )
        path = self.directory / self.metadata_file
        if path.is_file():
            try:
                existing = json.loads(path.read_text())
            except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError
                raise OutputError(f"{path} cannot be read ({type(err).__name__})") from None
            if not isinstance(existing, dict):
                raise OutputError(f"{path} is not the settings of a certify run")
            self.check_metadata(existing)
        else:
            try:
                write_atomic(path, [json.dumps(self.metadata, indent=2, sort_keys=True) + "\n"])
            except OSError as err:
                raise OutputError(f"cannot write {path}: {err.strerror}") from None

    def check_metadata(self, existing: dict) -> None:
        for key in sorted(set(existing) | set(self.metadata)):
            old, new = existing.get(key), self.metadata.get(key)
            if old != new:
                raise OutputError(
                    f"{self.directory} holds a run with {key} = {old!r}, this run has "
                    f"{key} = {new!r}; refusing to mix them (choose another output directory)"
                )

    # ------------------------------------------------------------------ parts
    def part_path(self, rank: int) -> Path:
        return self.directory / "parts" / f"rank{rank}.tsv"

    def _complete_lines(self, path: Path) -> list[str]:
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")[:-1]  # a last piece without "\n" was cut by a kill
        rows = [line for line in lines if len(line.split("\t")) == len(self.header) + 1]
        for number, line in enumerate(rows, 1):
            fields = line.split("\t")
            try:
                for value in fields[:2] + fields[-1].split(" "):  # idx, label, counts
                    int(value)
            except ValueError:
                raise OutputError(
                    f"{path} has a row this program did not write ({number}: "
                    f"{line[:40]!r}); remove it or choose another output directory"
                ) from None
        return rows

    def read_parts(self) -> dict[int, str]:
        """Finished rows by dataset index, from every part file (any number of processes)."""
        rows: dict[int, str] = {}
        for path in sorted((self.directory / "parts").glob("rank*.tsv")):
            for line in self._complete_lines(path):
                rows.setdefault(int(line.split("\t", 1)[0]), line)
        return rows

    def open_part(self, rank: int) -> int:
        """A descriptor appending to this rank's part file, a torn last line cut off first."""
        path = self.part_path(rank)
        if path.exists():
            data = path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                os.truncate(path, keep)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def row(
        self, idx: int, label: int, top_labels, radii, seconds: float, counts, samples=None
    ) -> str:
        """One part line: the TSV fields, then the counts (space separated).

        ``samples``: the samples drawn for the example (a sequential run's column)."""
        fields = [
            str(idx), str(label), *map(str, top_labels), *map(format_radius, radii),
            *([str(samples)] * self.sequential), f"{seconds:.4f}", " ".join(map(str, counts)),
        ]  # fmt: skip
        return "\t".join(fields) + "\n"

    def append(self, fd: int, lines: Sequence[str]) -> None:
        data = "".join(lines).encode()
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
            os.fsync(fd)
        except OSError as err:  # e.g. a full disk: the rows before stay, a torn one is cut
            raise OutputError(
                f"cannot write to {self.directory / 'parts'}: {err.strerror}; the finished "
                "examples are kept, rerun the same command to continue"
            ) from None

    # ------------------------------------------------------------------ merge
    def merge(self, selected: Sequence[int]) -> bool:
        """Write ``certify.tsv`` and ``counts.txt`` (not for a sequential run: its counts were
        stopped by looking at them, and ``radius`` on them would not be a certificate) if every
        selected example is done."""
        rows = self.read_parts()
        if any(int(i) not in rows for i in selected):
            return False
        lines = [rows[int(i)].split("\t") for i in sorted(int(i) for i in selected)]
        table = ["\t".join(self.header) + "\n"] + ["\t".join(f[:-1]) + "\n" for f in lines]
        counts = np.array([[int(v) for v in f[-1].split()] for f in lines], dtype=np.int64)
        labels = np.array([int(f[1]) for f in lines], dtype=np.int64)
        write_atomic(self.directory / RESULTS, table)
        if not self.sequential:
            write_atomic(self.directory / COUNTS, [format_counts(counts, labels)])
        return True
