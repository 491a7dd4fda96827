"""Sampler throughput: ``sample_counts`` against noise + forward, optionally against a revision.

For every model and n, on ``inputs`` inputs (about ``--scale`` times the model's sample budget
per measurement, at least one input), one worker process measures in noisy samples per second:

- (a) noise + forward: torch's ``normal_`` into one batch, the input added, forward and argmax,
  at the batch size the sampler uses for the call (``min(auto_batch_size, inputs * n)``);
- (b) ``SmoothedClassifier(model, c, 0.25).sample_counts(x, n, seed=0)``, automatic batch size
  (or ``--batch-size``).

Each is measured after an untimed warm-up call. With ``--against REV`` the script checks REV
out with ``git worktree add`` in a temporary directory and measures it in worker processes
that find ``certify`` there first (``PYTHONPATH``; each worker reports ``certify.__file__``,
which is checked), alternating with the working tree's workers for ``--rounds`` rounds; the
table gives the best round of each and the ratio (b) now / (b) REV per size. On a CPU the
workers run with glibc's malloc keeping freed memory (``MALLOC_SETTINGS``, see
docs/performance.md) unless glibc's malloc variables are set already.

    python benchmarks/sampler_throughput.py                          # CPU: digits, ResNet-20/110
    python benchmarks/sampler_throughput.py --against HEAD~1         # before/after table
    python benchmarks/sampler_throughput.py --device cuda --scale 100 --models cifar_resnet110
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 0.25
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
#: arch: (input shape, classes, normalisation, samples per measurement on a CPU at scale 1)
MODELS = {
    "digits_cnn": ((1, 8, 8), 10, ((0.3053,), (0.3760,)), 300_000),
    "cifar_resnet20": ((3, 32, 32), 10, CIFAR10, 2500),
    "cifar_resnet110": ((3, 32, 32), 10, CIFAR10, 1000),
    "resnet50": ((3, 224, 224), 1000, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 100),
}
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:3], choices=list(MODELS))
    parser.add_argument("--n", nargs="+", type=int, default=[100, 1000, 10_000])
    parser.add_argument("--scale", type=float, default=1.0, help="x the samples per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="worker runs per code version")
    parser.add_argument("--batch-size", type=int, help="explicit (else automatic) batch size")
    parser.add_argument("--against", metavar="REV", help="also measure this git revision")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, samples: int, device) -> float:
    """Samples per second of ``fn()`` after one untimed warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return samples / (time.perf_counter() - start)


def worker(args) -> list[dict]:
    """The measurements of the ``certify`` this process imports (see the module docstring)."""
    import torch

    import certify
    from certify import SmoothedClassifier
    from lightning_modules.models import build_network

    device, rows = torch.device(args.device), []
    for name in args.models:
        shape, classes, norm, budget = MODELS[name]
        torch.manual_seed(0)
        model = build_network(name, classes, *norm).to(device).eval()
        smoothed = SmoothedClassifier(model, classes, SIGMA)
        for n in args.n:
            if n <= budget * args.scale:  # else one input takes far longer than a measurement
                inputs = max(1, round(budget * args.scale / n))
                rows.append(measure(smoothed, shape, n, inputs, args.batch_size))
                rows[-1].update(model=name, certify=certify.__file__)
                print(f"  {name} n={n}: {rows[-1]}", flush=True)
    return rows


def measure(smoothed, shape, n: int, inputs: int, batch_size: int | None) -> dict:
    """(a) and (b) for ``inputs`` inputs of ``shape`` and n samples each."""
    import torch

    device = smoothed.device
    x = torch.rand((inputs, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    sampled = rate(lambda: smoothed.sample_counts(x, n, batch_size, 0), inputs * n, device)
    batch = min(batch_size or smoothed.auto_batch_size(shape), inputs * n)
    noisy = torch.empty((batch, *shape), device=device)  # (batch, *shape)
    passes = math.ceil(inputs * n / batch)

    @torch.inference_mode()
    def noise_and_forward() -> None:
        for _ in range(passes):
            noisy.normal_(0.0, SIGMA).add_(x[0])
            smoothed.model(noisy).argmax(dim=1)  # (batch,)

    reference = rate(noise_and_forward, passes * batch, device)
    return {"n": n, "inputs": inputs, "batch": batch, "a": reference, "b": sampled}


def run_worker(args, code: Path, out: Path) -> list[dict]:
    """One worker process measuring the code under ``code``; checks that it is that code."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
    }
    if args.device == "cpu" and not any(
        k in os.environ for k in (*MALLOC_SETTINGS, "GLIBC_TUNABLES")
    ):
        env.update(MALLOC_SETTINGS)
    argv = [sys.executable, __file__, "--worker", "--json", str(out), "--device", args.device]
    argv += ["--scale", str(args.scale), "--models", *args.models, "--n", *map(str, args.n)]
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    subprocess.run(argv, env=env, cwd=code, check=True)
    rows = json.loads(out.read_text())
    for row in rows:
        if not Path(row["certify"]).resolve().is_relative_to(code.resolve()):
            raise RuntimeError(f"measured {row['certify']}, not the code in {code}")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        args.json.write_text(json.dumps(worker(args)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run removes its worktree
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"now": ROOT}
        if args.against:
            before = Path(tmp, "before")
            git = ["git", "-C", str(ROOT), "worktree"]
            subprocess.run([*git, "add", "--detach", "-q", str(before), args.against], check=True)
            versions[args.against] = before
        best: dict[tuple, dict] = {}
        try:
            for r in range(args.rounds):
                for label, code in versions.items():
                    print(f"round {r + 1}, {label}: {code}", flush=True)
                    for row in run_worker(args, code, Path(tmp, "rows.json")):
                        key = (label, row["model"], row["n"])
                        if key not in best or row["b"] > best[key]["b"]:
                            best[key] = row
        finally:
            if args.against:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)]
                )
    print(table(best, list(versions)))
    if args.json:
        args.json.write_text(json.dumps([{"code": k[0], **v} for k, v in best.items()], indent=1))


def table(best: dict, labels: list[str]) -> str:
    """Markdown: per model and n, each version's batch, (a), (b), (b)/(a); (b) now / (b) REV."""
    head = "| model | n | inputs |"
    head += "".join(f" batch {v} | (a) {v} | (b) {v} | (b)/(a) {v} |" for v in labels)
    head += f" (b) now / {labels[1]} |" if len(labels) > 1 else ""
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for _, model, n in sorted(k for k in best if k[0] == "now"):
        rows = [best.get((v, model, n)) for v in labels]
        line = f"| {model} | {n:,} | {rows[0]['inputs']} |"
        for r in rows:
            line += " - | - | - | - |" if r is None else f" {r['batch']} | {r['a']:,.0f} |"
            line += "" if r is None else f" {r['b']:,.0f} | {r['b'] / r['a']:.3f} |"
        if len(rows) > 1 and rows[1]:
            line += f" {rows[0]['b'] / rows[1]['b']:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n\nsamples per second, best of the rounds; (a): noise + forward"


if __name__ == "__main__":
    main()
