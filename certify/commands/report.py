"""Tables and plots of certified top-k accuracy from a radii TSV (``certify`` or ``radius``)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import torch

from certify.commands.countfile import write_atomic
from certify.training.metric import CertifiedTopKAccuracy

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
METADATA = "certify.json"
_RADIUS_COLUMN = re.compile(r"radius_top([0-9]+)")


class ReportError(ValueError):
    """A radii file that cannot be reported on."""


def read_radii_tsv(path: str | Path) -> tuple[list[int], np.ndarray]:
    """``(top_k, radii (N, K))`` from a TSV with ``radius_top{k}`` columns (``nan`` = abstain)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot read ({err})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ReportError(f"{path}: the file is empty")
    header = lines[0].split("\t")
    columns = [
        (i, int(m.group(1))) for i, h in enumerate(header) if (m := _RADIUS_COLUMN.fullmatch(h))
    ]
    if not columns:
        raise ReportError(f"{path}: no radius_top{{k}} column in the header {header!r}")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise ReportError(
                f"{path}: line {line_no} has {len(fields)} fields, expected {len(header)}"
            )
        try:
            rows.append([float(fields[i]) for i, _ in columns])
        except ValueError:
            raise ReportError(f"{path}: line {line_no} has a radius that is not a number") from None
    if not rows:
        raise ReportError(f"{path}: no examples (only a header)")
    radii = np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))
    if (radii < 0).any():
        raise ReportError(f"{path}: negative radius")
    return [k for _, k in columns], radii


def accuracy_table(radii: np.ndarray, top_k: list[int], at: tuple[float, ...]):
    """``(accuracy (K, R), acr (K,))`` computed by :class:`CertifiedTopKAccuracy` itself."""
    metric = CertifiedTopKAccuracy(top_k, at)
    metric.update(torch.from_numpy(radii))
    accuracy, acr = metric.compute_table()
    return accuracy.numpy(), acr.numpy()


def _describe(meta: dict, count: int, samples: np.ndarray | None = None) -> str:
    parts = [f"examples: {count}"]
    if meta.get("mode") == "sequential":
        parts.append(f"sequential, n_max: {meta.get('n_max')}")
        if samples is not None:
            parts.append(f"mean samples: {samples.mean():.0f} (median {np.median(samples):.0f})")
        parts.append("ACR over the targets reached (a lower bound)")
    for key in ("n", "alpha", "sigma", "bounds", "split", "skip", "max_examples"):
        if meta.get(key) is not None:
            parts.append(f"{key}: {meta[key]}")
    if "n" not in meta and meta.get("mode") != "sequential":
        parts.append("n: unknown (pass --n)")
    return ", ".join(parts)


def read_samples(path: Path) -> np.ndarray | None:
    """The ``samples`` column of a sequential run's ``certify.tsv`` (None without one)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = lines[0].split("\t")
    if "samples" not in header:
        return None
    column = header.index("samples")
    try:
        return np.array([int(line.split("\t")[column]) for line in lines[1:]], dtype=np.int64)
    except ValueError:
        raise ReportError(f"{path}: a samples value is not an integer") from None


def markdown_table(top_k, at, accuracy, acr, description: str) -> str:
    head = "| k | " + " | ".join(f"r = {r:g}" for r in at) + " | ACR |"
    rule = "|---" * (len(at) + 2) + "|"
    body = [
        f"| top-{k} | " + " | ".join(f"{100 * v:.1f}%" for v in accuracy[i]) + f" | {acr[i]:.3f} |"
        for i, k in enumerate(top_k)
    ]
    return "\n".join([f"Certified top-k accuracy ({description})", "", head, rule, *body]) + "\n"


def csv_table(top_k, at, accuracy, acr) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["k", *(f"certified@{r:g}" for r in at), "acr"])
    for i, k in enumerate(top_k):
        writer.writerow([k, *(f"{v:.6f}" for v in accuracy[i]), f"{acr[i]:.6f}"])
    return buffer.getvalue()


def plot_curves(radii: np.ndarray, top_k, description: str, path: Path) -> None:
    """Certified accuracy against radius, one curve per k (the paper's figure 1 style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = radii[np.isfinite(radii)]
    top = max(1.0, float(finite.max()) * 1.05) if finite.size else 1.0
    grid = np.linspace(0.0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(top_k):
        certified = np.nan_to_num(radii[:, i], nan=-1.0)
        ax.plot(grid, (certified[:, None] >= grid[None, :]).mean(axis=0), label=f"top-{k}")
    ax.set(xlabel="radius (l2)", ylabel="certified accuracy", ylim=(0, 1.02), xlim=(0, top))
    subtitle = "\n".join(textwrap.wrap(description, width=70))  # fits the figure's width
    ax.set_title(f"Certified top-k accuracy\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def write_report(tsv: str | Path, at=None, output_dir=None, n: int | None = None) -> dict:
    """Write ``report.md``, ``report.csv`` and ``certified_accuracy.png``; return the numbers.

    ``at``: the radii of the table (default: ``DEFAULT_RADII``, or a sequential run's targets:
    its radii are targets, so accuracy between them would be understated).
    """
    tsv = Path(tsv)
    top_k, radii = read_radii_tsv(tsv)
    meta_path = tsv.parent / METADATA
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except ValueError:  # a damaged certify.json: the report names no settings
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    if n is not None:
        meta["n"] = n
    if at is None:
        sequential = meta.get("mode") == "sequential" and isinstance(meta.get("radii"), list)
        at = meta["radii"] if sequential else DEFAULT_RADII
    at = tuple(float(r) for r in at)
    if not at or any(not (r >= 0 and math.isfinite(r)) for r in at):
        raise ReportError(f"radii must be finite numbers >= 0, got {list(at)}")
    accuracy, acr = accuracy_table(radii, top_k, at)
    description = _describe(meta, len(radii), read_samples(tsv))
    out = Path(output_dir) if output_dir is not None else tsv.parent
    out.mkdir(parents=True, exist_ok=True)  # only once the numbers stand
    write_atomic(out / "report.md", [markdown_table(top_k, at, accuracy, acr, description)])
    write_atomic(out / "report.csv", [csv_table(top_k, at, accuracy, acr)])
    plot_curves(radii, top_k, description, out / "certified_accuracy.png")
    return {
        "top_k": top_k,
        "radii": list(at),
        "accuracy": accuracy,
        "acr": acr,
        "examples": len(radii),
        "description": description,
        "output_dir": out,
    }


def configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tsv", help="certify.tsv (or a `radius` output) with radius_top{k} columns")
    parser.add_argument(
        "--radii",
        type=float,
        nargs="+",
        help="radii of the table (default: 0 0.25 0.5 0.75 1 1.5 2, or a sequential run's)",
    )
    parser.add_argument("--output-dir", help="where to write (default: next to the TSV)")
    parser.add_argument("--n", type=int, help="samples per example, when no certify.json says")


def run_report(args: argparse.Namespace) -> None:
    if args.n is not None and args.n < 1:
        raise ReportError(f"n must be an integer >= 1, got {args.n}")
    result = write_report(args.tsv, args.radii, args.output_dir, args.n)
    print((result["output_dir"] / "report.md").read_text(), end="")
