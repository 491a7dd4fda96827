"""Certified top-k accuracy of digits models trained with each loss (not a test).

For every loss (``configs/digits.yaml``, ``digits_consistency.yaml``, ``digits_smoothadv.yaml``),
noise level and seed: ``topk-smoothing fit`` (the config's recipe and epochs, the seed as
``seed_everything``, no logger, no test), then ``topk-smoothing certify`` of the last epoch's
checkpoint on the whole test split (360 images) with n samples, alpha, SimuEM bounds, k = 1
and 3, certification seed 0. Certified accuracy at the radii and the ACR come from the
report ``certify`` writes. The table gives, per loss and sigma, the mean over seeds and the
sample standard deviation; ``results.json`` holds every run.

Resumable: a run whose ``result.json`` exists is skipped; an interrupted fit resumes from its
``last.ckpt`` (exactly), an interrupted certification continues where it stopped. Run it at
low priority on a shared machine:

    nice -n 19 python benchmarks/training_recipes.py --output-dir runs/training_recipes
    python benchmarks/training_recipes.py --output-dir runs/training_recipes --table-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import machine  # noqa: E402

CONFIGS = {
    "gaussian": REPO / "configs" / "digits.yaml",
    "consistency": REPO / "configs" / "digits_consistency.yaml",
    "smoothadv": REPO / "configs" / "digits_smoothadv.yaml",
}
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
TOP_K = (1, 3)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "certify", *args]


def run(args: list[str], log: Path, threads: int) -> float:
    """Run a command with its output in ``log``; return its wall time, or exit on failure."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the subprocess
    start = time.perf_counter()
    with open(log, "a") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}; see {log}")
    return time.perf_counter() - start


def last_checkpoint(fit_dir: Path) -> Path | None:
    """The fit's ``last.ckpt`` (in the run folder the fit made under ``fit_dir``), if any."""
    found = sorted(fit_dir.glob("**/last.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_report(csv_path: Path) -> dict:
    """``{k: {"certified": [at each radius], "acr": float}}`` from ``certify``'s report.csv."""
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    table = {}
    for row in rows:
        certified = [float(row[f"certified@{r:g}"]) for r in RADII]
        table[int(row["k"])] = {"certified": certified, "acr": float(row["acr"])}
    return table


def one_run(
    loss: str, sigma: float, seed: int, out: Path, n: int, alpha: float, threads: int
) -> dict:
    folder = out / loss / f"sigma{sigma:g}" / f"seed{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    config = ["--config", str(CONFIGS[loss]), "--model.sigma", str(sigma)]
    fit_dir = folder / "fit"
    last = last_checkpoint(fit_dir)
    epochs = yaml.safe_load(CONFIGS[loss].read_text())["trainer"]["max_epochs"]
    fit_seconds = None  # the fit ran in an earlier invocation
    if last is None or read_checkpoint(last)["epoch"] < epochs - 1:
        resume = ["--ckpt_path", str(last)] if last else []
        print(f"fit {loss} sigma={sigma:g} seed={seed}", flush=True)
        fit_seconds = run(
            command(
                "fit", *config, "--seed_everything", str(seed), "--trainer.logger", "false",
                "--test_after_fit", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(fit_dir), *resume,
            ),
            folder / "fit.log",
            threads,
        )  # fmt: skip
        last = last_checkpoint(fit_dir)
    print(f"certify {loss} sigma={sigma:g} seed={seed}", flush=True)
    certify_dir = folder / "certify"
    certify_seconds = run(
        command(
            "certify", *config, "--ckpt_path", str(last), "--n", str(n), "--alpha", str(alpha),
            "--k", f"[{','.join(map(str, TOP_K))}]", "--split", "test", "--seed", "0",
            "--output_dir", str(certify_dir), "--trainer.logger", "false",
        ),
        folder / "certify.log",
        threads,
    )  # fmt: skip
    result = {
        "loss": loss,
        "sigma": sigma,
        "seed": seed,
        "n": n,
        "alpha": alpha,
        "epochs": epochs,
        "settings": {  # the loss's settings the model resolved (null: another loss's)
            key: value
            for key, value in read_checkpoint(last)["hyper_parameters"].items()
            if key.startswith(("num_noise", "consistency_", "smoothadv_"))
        },
        "threads": threads,
        "fit_seconds": None if fit_seconds is None else round(fit_seconds, 1),
        "certify_seconds": round(certify_seconds, 1),
        "top_k": {str(k): v for k, v in read_report(certify_dir / "report.csv").items()},
    }
    result_path.write_text(json.dumps(result, indent=1))
    return result


def summarise(results: list[dict]) -> dict:
    """Per (loss, sigma, k): mean and sample standard deviation over seeds of each number."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["loss"], r["sigma"]), []).append(r)
    summary = {}
    for (loss, sigma), runs in groups.items():
        for k in TOP_K:
            rows = [r["top_k"][str(k)]["certified"] + [r["top_k"][str(k)]["acr"]] for r in runs]
            columns = list(zip(*rows, strict=True))
            summary[f"{loss} sigma={sigma:g} top-{k}"] = {
                "seeds": [r["seed"] for r in runs],
                "mean": [statistics.fmean(c) for c in columns],
                "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns],
            }
    return summary


def markdown(summary: dict) -> str:
    head = " | ".join(f"r = {r:g}" for r in RADII)
    lines = [f"| loss | sigma | k | {head} | ACR | seeds |", "|---" * (len(RADII) + 5) + "|"]
    for key, row in summary.items():
        loss, sigma, k = key.split()
        pairs = zip(row["mean"][:-1], row["std"][:-1], strict=True)
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in pairs]
        acr = f"{row['mean'][-1]:.3f} ± {row['std'][-1]:.3f}"
        seeds = len(row["seeds"])
        lines.append(f"| {loss} | {sigma[6:]} | {k[4:]} | {' | '.join(cells)} | {acr} | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "training_recipes")
    parser.add_argument("--losses", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--sigmas", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (1 suits a shared CPU)"
    )
    parser.add_argument("--table-only", action="store_true", help="summarise finished runs only")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for sigma in args.sigmas:
        for seed in args.seeds:
            for loss in args.losses:
                folder = out / loss / f"sigma{sigma:g}" / f"seed{seed}" / "result.json"
                if args.table_only:
                    if folder.exists():
                        results.append(json.loads(folder.read_text()))
                    continue
                results.append(one_run(loss, sigma, seed, out, args.n, args.alpha, args.threads))
    summary = summarise(results)
    report = {"machine": machine(torch.device("cpu")), "summary": summary, "runs": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "table.md").write_text(markdown(summary) + "\n")
    print(json.dumps(report["machine"]))
    print(markdown(summary))


if __name__ == "__main__":
    main()
