"""Live certification's cost in a fit: the ``CertificationCallback`` with fixed n against
``sequential: true`` (n the most samples per example), at the same n.

Each run is ``topk-smoothing fit --config configs/digits.yaml`` (same seed, so the same model),
without a logger and without the test after the fit, in a temporary directory, in its own
process; only the callback's ``n`` and ``sequential`` change. The callback certifies 90
validation images at epochs 10, 20 and 30 (k = 1, 3, 5; alpha = 0.001; sequential targets: its
radii). The table gives the fit's own line "Certification took X s of the Y s fit", the last
certified top-k accuracy table, and the mean samples per example over the fit's certifications.

    python benchmarks/callback_share.py                   # n = 1,000 and 10,000; a few minutes
    python benchmarks/callback_share.py --n 1000 100000   # other n
    python benchmarks/callback_share.py --quick           # 1 epoch, 8 images: checks it runs
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from certify.training.callback import CertificationCallback  # noqa: E402

SHARE = re.compile(r"Certification took ([\d.]+) s of the ([\d.]+) s fit")
ROW = re.compile(r"^\| top-(\d+) \| (.*) \| ([\d.]+) \|$")
SAMPLES = re.compile(r"^Mean samples per example: ([\d.]+)$")


def digits_config() -> tuple[dict, dict]:
    """``configs/digits.yaml`` and, in it, the ``CertificationCallback``'s entry."""
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    (callback,) = [c for c in callbacks if c["class_path"] == "certify.CertificationCallback"]
    return config, callback


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class CountingCallback(CertificationCallback):
    """The project's callback, printing at the fit's end the mean samples per example over all
    the fit's certifications (fixed n: n)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        self.drawn: list[int] = []

    def certify_share(self, trainer, pl_module):
        metric = super().certify_share(trainer, pl_module)
        count = len(self.indices[trainer.global_rank :: trainer.world_size])
        self.drawn += self.samples if self.sequential else [self.n] * count
        return metric

    def on_fit_end(self, trainer, pl_module) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.drawn:
            print(f"Mean samples per example: {sum(self.drawn) / len(self.drawn):.1f}")


def fit(n: int, sequential: bool, quick: bool, workdir: Path) -> dict:
    """One digits fit; its certify and fit seconds, last table and mean samples per example."""
    config, callback = digits_config()
    config["test_after_fit"] = False
    trainer = config["trainer"]
    trainer.update(logger=False, default_root_dir=str(workdir / "runs"))
    callback["class_path"] = "benchmarks.callback_share.CountingCallback"
    callback["init_args"].update(n=n, sequential=sequential)
    if quick:
        trainer["max_epochs"] = 1
        callback["init_args"].update(every_n_epochs=1, num_examples=8)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "certify", "fit", "--config", str(path)],
        cwd=workdir, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"fit failed (n = {n}, sequential = {sequential}):\n{done.stderr[-3000:]}")
    result: dict = {"n": n, "mode": "sequential" if sequential else "fixed", "rows": {}}
    for line in done.stdout.splitlines():
        if match := SHARE.search(line):
            result["certify"], result["fit"] = float(match[1]), float(match[2])
        elif match := ROW.match(line.strip()):
            result["rows"][int(match[1])] = [cell.strip() for cell in match[2].split("|")]
        elif match := SAMPLES.match(line.strip()):
            result["samples"] = float(match[1])
    if "certify" not in result or not result["rows"]:
        sys.exit(f"no share line or table in the fit's output:\n{done.stdout[-3000:]}")
    return result


def markdown(results: list[dict], radii: list[float], top_k: list[int]) -> str:
    """One row per fit and k: its seconds, share, mean samples and certified accuracy."""
    head = ["n", "mode", "certify s", "fit s", "share", "mean samples", "k"]
    head += [f"r = {r:g}" for r in radii]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for res in results:
        cells = [f"{res['n']:,}", res["mode"], f"{res['certify']:.1f}", f"{res['fit']:.1f}"]
        cells += [f"{res['certify'] / res['fit']:.0%}", f"{res.get('samples', float('nan')):,.0f}"]
        for k in top_k:
            row = [*cells, f"top-{k}", *res["rows"].get(k, ["?"] * len(radii))]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 8 images: a check")
    args = parser.parse_args()
    radii, top_k = (digits_config()[1]["init_args"][key] for key in ("radii", "top_k"))
    print(f"load average at the start: {load()}", flush=True)
    results = []
    for n in args.n:
        for sequential in (False, True):
            with tempfile.TemporaryDirectory(prefix="callback_share_") as workdir:
                results.append(fit(n, sequential, args.quick, Path(workdir)))
            done = results[-1]
            print(f"n = {n}, {done['mode']}: {done['certify']:.1f} s of {done['fit']:.1f} s")
    info = {**machine(torch.device("cpu")), "load average at the end": load()}
    print("\n" + ", ".join(f"{key}: {value}" for key, value in info.items()) + "\n")
    print(markdown(results, radii, top_k))


if __name__ == "__main__":
    main()
