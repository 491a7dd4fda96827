"""The output directory of ``topk-smoothing predict``: the part files of ``certify``, other rows.

A part line holds the example's index, its label (-1 for an image file), the k labels (-1 for
an abstention), their radii (``nan`` for an abstention), the sampling time, then the n0
selection counts and the n fresh counts (0s where the selection abstained and no fresh sample
was drawn). When every example is done, ``predict.tsv`` and ``counts.tsv`` are written,
sorted by index, through a temporary file and a rename.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from certify.commands.countfile import write_atomic
from certify.commands.outputs import PREDICT_METADATA, CertifyOutput

PREDICTIONS = "predict.tsv"
COUNTS = "counts.tsv"


def _field(text: str) -> str:
    """A file name as one TSV field: tabs, newlines and backslashes escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class PredictOutput(CertifyOutput):
    """One predict run's output directory.

    Args:
        directory: where the files go (created if missing).
        metadata: the settings that determine the results (``predict.json``).
        k: the size of the label sets.
        names: the image files' names by index, or None for a split of a data set.
    """

    metadata_file = PREDICT_METADATA

    def __init__(self, directory: str | os.PathLike, metadata: dict, k: int, names=None) -> None:
        super().__init__(directory, metadata, (k,))
        self.k, self.names = k, names
        self.header = [
            "idx", "label", *(f"pred{i + 1}" for i in range(k)),
            *(f"radius{i + 1}" for i in range(k)), "seconds",
        ]  # fmt: skip

    def merge(self, selected: Sequence[int]) -> bool:
        """Write ``predict.tsv`` and ``counts.tsv`` if every selected example is done."""
        rows = self.read_parts()
        if any(int(i) not in rows for i in selected):
            return False
        lines = [rows[int(i)].split("\t") for i in sorted(int(i) for i in selected)]
        header = list(self.header)
        if self.names is not None:  # image files: their name instead of an unknown label
            header[1] = "file"
            for fields in lines:
                fields[1] = _field(self.names[int(fields[0])])
        table = ["\t".join(header) + "\n"] + ["\t".join(f[:-1]) + "\n" for f in lines]
        counts = ["idx\tselection_counts\tcounts\n"]
        for fields in lines:
            values = fields[-1].split(" ")
            half = len(values) // 2
            counts.append(f"{fields[0]}\t{' '.join(values[:half])}\t{' '.join(values[half:])}\n")
        write_atomic(self.directory / PREDICTIONS, table)
        write_atomic(self.directory / COUNTS, counts)
        return True
