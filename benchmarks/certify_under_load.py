"""``topk-smoothing certify`` of the digits model on a quiet CPU and with every core busy.

The sampler picks its batch size without timing anything, so a burst of load from other
processes while a run starts cannot lock in a slow choice: a busy machine should cost about
its fair share (2x with both cores of a 2-core machine taken by two other processes), not
more. The script trains the digits model of ``configs/digits.yaml`` (unless given
``--ckpt``), then certifies the first ``--max_examples`` test examples at ``--n`` samples,
``--rounds`` times quiet and ``--rounds`` times with one spinning process per core, and
prints the seconds per example of each (the median over rounds) and their ratio.

    python benchmarks/certify_under_load.py                     # ~1-2 min on 2 cores
    python benchmarks/certify_under_load.py --ckpt runs/.../best-epoch029.ckpt --n 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402


def spin() -> None:  # a process that keeps one core busy until it is killed
    while True:
        pass


def run(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def train(workdir: Path) -> Path:
    run(
        ["topk-smoothing", "fit", "--config", str(ROOT / "configs/digits.yaml"),
         "--trainer.logger", "false", "--trainer.default_root_dir", str(workdir / "fit"),
         "--test_after_fit", "false"],
        workdir,
    )  # fmt: skip
    return next((workdir / "fit").rglob("best-*.ckpt"))


def certify_seconds(ckpt: Path, args, workdir: Path, name: str) -> float:
    """Seconds per example of one ``certify`` run (wall time of the whole command)."""
    output = workdir / name
    seconds = run(
        ["topk-smoothing", "certify", "--config", str(ROOT / "configs/digits.yaml"),
         "--ckpt_path", str(ckpt), "--n", str(args.n), "--max_examples", str(args.max_examples),
         "--output_dir", str(output), "--trainer.logger", "false"],
        workdir,
    )  # fmt: skip
    return seconds / args.max_examples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, help="a digits checkpoint (default: train one)")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--max_examples", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=os.cpu_count(), help="spinning processes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ckpt = args.ckpt.resolve() if args.ckpt else train(workdir)
        quiet, busy = [], []
        for r in range(args.rounds):
            quiet.append(certify_seconds(ckpt, args, workdir, f"quiet{r}"))
            hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
            for hog in hogs:
                hog.start()
            try:
                busy.append(certify_seconds(ckpt, args, workdir, f"busy{r}"))
            finally:
                for hog in hogs:
                    hog.kill()
    result = {
        "machine": machine(torch.device("cpu")),
        "n": args.n,
        "examples": args.max_examples,
        "busy_processes": args.busy,
        "quiet_s_per_example": statistics.median(quiet),
        "busy_s_per_example": statistics.median(busy),
    }
    result["busy_over_quiet"] = result["busy_s_per_example"] / result["quiet_s_per_example"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
