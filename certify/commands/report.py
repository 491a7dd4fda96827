"""``topk-smoothing report``: tables and a plot of certified top-k accuracy from a radii TSV."""

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
from certify.math.validation import UsageError
from certify.training.metric import (
    CertifiedTopKAccuracy,
    define_steps,
    markdown_table,
    radius_key,
    wandb_table,
)

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def _table(path: Path) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return [row for row in csv.reader(handle, delimiter="\t") if any(row)]
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UsageError(f"{path}: cannot read ({err})") from None


def read_radii_tsv(path: str | Path) -> tuple[list[int], np.ndarray]:
    """``(top_k, radii (N, K))`` from the ``radius_top{k}`` columns (``nan``: abstain)."""
    rows = _table(Path(path))
    if not rows:
        raise UsageError(f"{path}: the file is empty")
    header, rows = rows[0], rows[1:]
    radius_k = [re.fullmatch(r"radius_top(\d+)", h) for h in header]
    columns = {i: int(m[1]) for i, m in enumerate(radius_k) if m}
    if not columns:
        raise UsageError(f"{path}: no radius_top{{k}} column in the header {header!r}")
    if not rows:
        raise UsageError(f"{path}: no examples (only a header)")
    radii = np.empty((len(rows), len(columns)))  # (N, K)
    for line, fields in enumerate(rows, start=2):
        if len(fields) != len(header):
            raise UsageError(
                f"{path}: line {line} has {len(fields)} fields, expected {len(header)}"
            )
        try:
            radii[line - 2] = [float(fields[i]) for i in columns]
        except ValueError:
            raise UsageError(f"{path}: line {line} has a radius that is not a number") from None
    if (radii < 0).any():
        raise UsageError(f"{path}: negative radius")
    return list(columns.values()), radii


def accuracy_table(radii: np.ndarray, top_k: list[int], at: tuple[float, ...]):
    metric = CertifiedTopKAccuracy(top_k, at)
    metric.update(torch.from_numpy(radii))
    accuracy, acr = metric.compute_table()
    return accuracy.numpy(), acr.numpy()


def describe(meta: dict, count: int, samples: np.ndarray | None) -> str:
    parts = [f"examples: {count}"]
    if meta.get("mode") == "sequential":
        parts.append(f"sequential, n_max: {meta.get('n_max')}")
        if samples is not None:
            parts.append(f"mean samples: {samples.mean():.0f} (median {np.median(samples):.0f})")
        parts.append("ACR over the targets reached (a lower bound)")
    elif "n" not in meta:
        parts.append("n: unknown (pass --n)")
    keys = ("n", "alpha", "sigma", "bounds", "split", "skip", "max_examples")
    return ", ".join(parts + [f"{key}: {meta[key]}" for key in keys if meta.get(key) is not None])


def plot_curves(radii: np.ndarray, top_k, description: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = radii[np.isfinite(radii)]
    top = max(1.0, float(finite.max()) * 1.05) if finite.size else 1.0
    grid = np.linspace(0.0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, k in enumerate(top_k):
        certified = np.nan_to_num(radii[:, i], nan=-1.0)  # (N,)
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
    write_atomic(path, [buffer.getvalue()])


def write_report(tsv: str | Path, at=None, output_dir=None, n: int | None = None) -> dict:
    """Write ``report.md``, ``report.csv`` and ``certified_accuracy.png`` next to ``tsv`` (or in
    ``output_dir``) at the radii ``at`` (default: a sequential run's targets, or DEFAULT_RADII);
    return the numbers. ``n``: samples per example, when no ``certify.json`` says."""
    tsv = Path(tsv)
    top_k, radii = read_radii_tsv(tsv)
    try:
        meta = json.loads((tsv.parent / "certify.json").read_text())
    except (OSError, ValueError):  # none, or damaged: the report names no settings
        meta = {}
    meta = {**(meta if isinstance(meta, dict) else {}), **({} if n is None else {"n": n})}
    if at is None:
        sequential = meta.get("mode") == "sequential" and isinstance(meta.get("radii"), list)
        at = meta["radii"] if sequential else DEFAULT_RADII
    at = tuple(float(r) for r in at)
    if not at or any(not (r >= 0 and math.isfinite(r)) for r in at):
        raise UsageError(f"radii must be finite numbers >= 0, got {list(at)}")
    accuracy, acr = accuracy_table(radii, top_k, at)
    header, *rows = _table(tsv)
    column = header.index("samples") if "samples" in header else None  # a sequential run's
    samples = None if column is None else np.array([r[column] for r in rows], dtype=np.int64)
    description = describe(meta, len(radii), samples)
    out = Path(output_dir) if output_dir is not None else tsv.parent
    out.mkdir(parents=True, exist_ok=True)  # only once the numbers stand
    replaced = (out / "report.md").is_file()
    write_atomic(out / "report.md", [markdown_table(top_k, at, accuracy, acr, description)])
    table = [["k", *(f"certified@{r:g}" for r in at), "acr"]]
    table += [[k, *(f"{v:.6f}" for v in accuracy[i]), f"{acr[i]:.6f}"] for i, k in enumerate(top_k)]
    write_atomic(out / "report.csv", [",".join(map(str, row)) + "\n" for row in table])
    plot_curves(radii, top_k, description, out / "certified_accuracy.png")
    return {"top_k": top_k, "radii": list(at), "accuracy": accuracy, "acr": acr,
            "examples": len(radii), "description": description, "output_dir": out,
            "replaced": replaced}  # fmt: skip


def configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tsv", help="certify.tsv (or a `radius` output) with radius_top{k} columns")
    parser.add_argument("--radii", type=float, nargs="+", help="radii of the table (default: "
                        "0 0.25 0.5 0.75 1 1.5 2, or a sequential run's)")  # fmt: skip
    parser.add_argument("--output-dir", help="where to write (default: next to the TSV)")
    parser.add_argument("--n", type=int, help="samples per example, when no certify.json says")


def run_report(args: argparse.Namespace) -> None:
    if args.n is not None and args.n < 1:
        raise UsageError(f"n must be an integer >= 1, got {args.n}")
    result = write_report(args.tsv, args.radii, args.output_dir, args.n)
    print((result["output_dir"] / "report.md").read_text(), end="")
    again = ", replacing the earlier report" if result["replaced"] else ""
    print(f"report: wrote report.md, report.csv and certified_accuracy.png to "
          f"{result['output_dir']}{again}")  # fmt: skip


def log_to_wandb(loggers, result: dict) -> None:
    """``write_report``'s numbers to the W&B loggers: scalars, table and plot on one row."""
    from pytorch_lightning.loggers import WandbLogger

    if not (loggers := [lg for lg in loggers if isinstance(lg, WandbLogger)]):
        return
    import wandb

    top_k, at, accuracy, acr = (result[key] for key in ("top_k", "radii", "accuracy", "acr"))
    scalars = {f"certify/{radius_key(k, r)}": float(accuracy[i, j])
               for i, k in enumerate(top_k) for j, r in enumerate(at)}  # fmt: skip
    scalars.update({f"certify/acr_top{k}": float(acr[i]) for i, k in enumerate(top_k)})
    image = wandb.Image(str(result["output_dir"] / "certified_accuracy.png"))
    row = {**scalars, "certify/table": wandb_table(top_k, at, accuracy, acr),
           "certify/curve": image, "trainer/global_step": 0}  # fmt: skip
    for logger in loggers:
        define_steps(logger.experiment, scalars)
        logger.experiment.log(row)
