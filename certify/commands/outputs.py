"""The output directory of ``certify`` and ``predict``: crash-safe, resumable, mergeable
(``docs/reliability.md``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from certify.commands.countfile import write_atomic
from certify.math.validation import UsageError

LOADER_ONLY = ("batch_size", "num_workers", "download", "verify_md5")


def data_identity(datamodule) -> dict:
    """The datamodule's class and the arguments that decide its examples (not the loader's)."""
    kind, hparams = type(datamodule), dict(getattr(datamodule, "hparams", {}))
    kept = {k: v for k, v in hparams.items() if k not in LOADER_ONLY and not k.startswith("_")}
    identity = {"class": f"{kind.__module__}.{kind.__qualname__}", **dict(sorted(kept.items()))}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from the file


def part_line(fields: Sequence, seconds: float, counts: Sequence[int]) -> str:
    return "\t".join([*map(str, fields), f"{seconds:.4f}", " ".join(map(str, counts))]) + "\n"


class RunOutput:
    """A run's ``directory``, its ``settings_file`` of ``metadata`` and part-line ``header``."""

    def __init__(self, directory, settings_file: str, metadata: dict, header: Sequence[str]):
        self.directory, self.settings_file = Path(directory), settings_file
        self.metadata, self.header = dict(metadata), list(header)

    def prepare(self) -> None:
        try:
            (self.directory / "parts").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            where = err.filename or self.directory
            raise UsageError(f"cannot create output directory {where}: {err.strerror}") from None
        if not os.access(self.directory, os.W_OK):
            raise UsageError(f"output directory {self.directory} is not writable")
        for other in {"certify.json", "predict.json"} - {self.settings_file}:
            if (self.directory / other).is_file():
                raise UsageError(
                    f"{self.directory} holds a {Path(other).stem} run ({other}); refusing to "
                    "mix them (choose another output directory)"
                )
        path = self.directory / self.settings_file
        if not path.is_file():
            try:
                write_atomic(path, [json.dumps(self.metadata, indent=2, sort_keys=True) + "\n"])
            except OSError as err:
                raise UsageError(f"cannot write {path}: {err.strerror}") from None
            return
        try:
            existing = json.loads(path.read_text())
        except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError
            raise UsageError(f"{path} cannot be read ({type(err).__name__})") from None
        if not isinstance(existing, dict):
            raise UsageError(f"{path} is not the settings of a {Path(path).stem} run")
        for key in sorted(set(existing) | set(self.metadata)):
            old, new = existing.get(key), self.metadata.get(key)
            if old != new:
                raise UsageError(
                    f"{self.directory} holds a run with {key} = {old!r}, this run has "
                    f"{key} = {new!r}; refusing to mix them (choose another output directory)"
                )

    def read_parts(self) -> dict[int, list[str]]:
        """Finished rows by dataset index; a torn last piece is ignored, a foreign row refused."""
        rows: dict[int, list[str]] = {}
        for path in sorted((self.directory / "parts").glob("rank*.tsv")):
            lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")[:-1]
            lines = [line.split("\t") for line in lines]
            for number, fields in enumerate(f for f in lines if len(f) == len(self.header) + 1):
                try:
                    [int(v) for v in fields[:2] + fields[-1].split(" ")]  # idx, label, counts
                except ValueError:
                    line = "\t".join(fields)[:40]
                    raise UsageError(
                        f"{path} has a row this program did not write ({number + 1}: {line!r}); "
                        "remove it or choose another output directory"
                    ) from None
                rows.setdefault(int(fields[0]), fields)
        return rows

    def open_part(self, rank: int) -> int:
        path = self.directory / "parts" / f"rank{rank}.tsv"
        if path.exists():
            os.truncate(path, path.read_bytes().rfind(b"\n") + 1)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, fd: int, lines: Sequence[str]) -> None:
        data = "".join(lines).encode()
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as err:  # the rows before stay; a torn one is cut on the rerun
            raise UsageError(
                f"cannot write to {self.directory / 'parts'}: {err.strerror}; the finished "
                "examples are kept, rerun the same command to continue"
            ) from None

    def merged(self, selected: Sequence[int]) -> list[list[str]] | None:
        rows = self.read_parts()
        return None if any(i not in rows for i in selected) else [rows[i] for i in sorted(selected)]

    def write(self, name: str, lines: Sequence[str]) -> None:
        write_atomic(self.directory / name, lines)
