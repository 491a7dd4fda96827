"""The ``--sequential`` mode of ``topk-smoothing certify``: what ``certify.json`` records.

A sequential run samples each example in growing rounds (``certify.math.sequential``) and
writes, per example, the largest target radius certified for each k and the number of samples
drawn (``samples`` column of ``certify.tsv``). ``--n`` is the most samples an example gets.
No ``counts.txt`` is written: its counts were stopped by looking at them, and the fixed-n
radius that ``topk-smoothing radius`` computes from a count file is not valid for such counts.
"""

from __future__ import annotations

from certify.commands.report import DEFAULT_RADII
from certify.math.sequential import (
    DEFAULT_FIRST,
    DEFAULT_FUTILITY,
    DEFAULT_GROWTH,
    DEFAULT_LAST_SHARE,
)
from certify.math.validation import check_radii


def sequential_metadata(metadata: dict, radii) -> tuple[dict, tuple[float, ...]]:
    """``certify.json`` of a sequential run (``n`` becomes ``n_max``) and its targets."""
    targets = check_radii(DEFAULT_RADII if radii is None else radii)
    meta = {key: value for key, value in metadata.items() if key != "n"}
    meta.update(
        mode="sequential",
        n_max=metadata["n"],
        radii=list(targets),
        first=DEFAULT_FIRST,
        growth=DEFAULT_GROWTH,
        futility=DEFAULT_FUTILITY,
        spending=f"{DEFAULT_LAST_SHARE:g} of alpha at the last look, the rest evenly",
    )
    return meta, targets
