"""Samples saved by sequential certification, at the certified accuracy of fixed n.

Every input is a multinomial with the proportions of a row of counts: CIFAR-10, the authors'
ResNet-110 at sigma = 0.25 (500 test images, ``tests/data/cifar10_resnet110_sigma0.25``);
digits, the CNN of ``configs/digits.yaml`` on its 360 test images at n = 10,000 (trained and
certified here in a temporary directory unless ``--digits-counts`` or ``--digits-ckpt``).

One stream of n_max = 100,000 samples per input is shared by every method (paired): fixed n
bounds all of it (``certified_radius``, SimuEM, alpha = 0.001) and reports the largest target
(0.25, 0.5, 0.75) within its radius; a sequential method reads prefixes of it. Certified top-k
accuracy and mean and median samples per input, averaged over ``--repeats`` streams, for
k = 1, 3, 5 alone and together (one run decides every k). Methods: ``sequential``, the
library's defaults; ``no budget``, the same pursuing every reachable target to n_max;
``mixture``, the mixture confidence sequence after the first look (``docs/sequential.md``).
``--variants`` adds the trade-off curve (futility, budget, bounds) and a clairvoyant ceiling.

    python benchmarks/sequential_savings.py                    # trains the digits model (~1-8 min)
    python benchmarks/sequential_savings.py --digits-counts runs/certify/digits/counts.txt
    python benchmarks/sequential_savings.py --sources cifar10 --variants
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from certify.commands.countfile import read_counts  # noqa: E402
from certify.math.radius import certified_radius  # noqa: E402
from certify.math.sequential import (  # noqa: E402
    DEFAULT_BUDGET,
    DEFAULT_FIRST,
    DEFAULT_FUTILITY,
    DEFAULT_GROWTH,
    DEFAULT_LAST_SHARE,
    _certify_rounds,
    look_schedule,
)

SIGMA, ALPHA, N_MAX, TARGETS = 0.25, 0.001, 100_000, np.array([0.25, 0.5, 0.75])
KS = ((1,), (3,), (5,), (1, 3, 5))
CIFAR_COUNTS = REPO / "tests" / "data" / "cifar10_resnet110_sigma0.25" / "counts.txt"


def plan(first, growth, last_share, futility, budget=1.0, mixture=0.0, correct=True) -> dict:
    """A sequential method: looks ``first * growth^j``; ``last_share`` of alpha at n_max, the
    rest evenly, or with a ``mixture`` share for the mixture sequence, at the first look
    (``correct=False``: every look at the full alpha, not valid); futility level and budget."""
    looks = look_schedule(N_MAX, first, growth)
    rest = (1 - last_share - mixture) / max(1, len(looks) - 1)
    weights = np.r_[np.full(len(looks) - 1, rest), last_share]
    if mixture:
        weights[1:-1], weights[0] = 0.0, 1 - last_share - mixture
    levels = ALPHA * (weights if correct else np.ones(len(looks)))
    return {"looks": looks, "levels": levels, "futility": futility,
            "budget": int(np.ceil(budget * N_MAX)), "mixture": ALPHA * mixture}  # fmt: skip


#: The methods of the main table: the library's defaults, the same without the futility
#: budget, and the mixture confidence sequence with the default budget.
METHODS = {
    "sequential": (DEFAULT_FIRST, DEFAULT_GROWTH, DEFAULT_LAST_SHARE, DEFAULT_FUTILITY,
                   DEFAULT_BUDGET),
    "no budget": (DEFAULT_FIRST, DEFAULT_GROWTH, DEFAULT_LAST_SHARE, DEFAULT_FUTILITY, 1.0),
    "mixture": (1000, 1.1, 0.5, DEFAULT_FUTILITY, DEFAULT_BUDGET, 0.45),
}  # fmt: skip
#: The variants of ``--variants``: (first, growth, share, futility, budget, mixture, correct).
VARIANTS = [
    (1000, 2.0, 1 / 8, 0.5, 1.0),
    (1000, 1.25, 0.75, 0.5, 1.0),
    *[(1000, 1.25, 0.75, 0.02, budget) for budget in (1.0, 0.85, 0.7, 0.5, 0.3, 0.15)],
    (1000, 1.25, 0.75, 0.1, 0.7),
    (1000, 1.25, 0.5, 0.02, 0.6),
    *[(1000, 1.1, 0.5, 0.02, budget, 0.45) for budget in (1.0, 0.7, 0.5)],
    *[(1000, 1.25, 0.75, 0.02, budget, 0.0, False) for budget in (1.0, 0.5)],
]


def methods() -> dict[str, dict]:
    return {name: plan(*settings) for name, settings in METHODS.items()}


def reached(radius: np.ndarray) -> np.ndarray:
    """How many targets each radius reaches (NaN: none)."""
    return (np.nan_to_num(radius, nan=-1.0)[..., None] >= TARGETS).sum(axis=-1)


def compare(p, labels, repeats: int, seed: int, plans: dict, ks_sets=KS) -> dict:
    """Certified accuracy and samples of fixed n and of each sequential method, per k set."""
    points = sorted({n for way in plans.values() for n in way["looks"]})
    out: dict = {}
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        sizes = np.diff([0, *points])
        steps = np.stack([rng.multinomial(m, p) for m in sizes], axis=1)  # (B, P, c)
        prefix = dict(zip(points, np.cumsum(steps, axis=1).transpose(1, 0, 2), strict=True))
        for ks in ks_sets:
            key = "+".join(map(str, ks))
            entry = out.setdefault(key, {})
            fixed = reached(certified_radius(prefix[N_MAX], labels, ks, SIGMA, ALPHA).numpy())
            entry.setdefault("fixed", []).append({"reached": fixed, "samples": N_MAX})
            for name, way in plans.items():
                cert = _certify_rounds(
                    prefix_draw(prefix, way["looks"]), labels, ks, SIGMA, TARGETS,
                    way["looks"], way["levels"], way["futility"], way["budget"], way["mixture"],
                )  # fmt: skip
                run = {"reached": reached(cert.radius.numpy()), "samples": cert.samples.numpy()}
                entry.setdefault(name, []).append(run)
    return out


def prefix_draw(prefix: dict, looks):
    """``draw(m, active)`` that returns the stream's samples between consecutive looks."""
    state = {"look": 0, "before": 0}

    def draw(m, active):
        n = looks[state["look"]]
        assert n - state["before"] == m
        before = prefix[state["before"]] if state["before"] else 0
        counts = (prefix[n] - before) * active.numpy()[:, None]
        state["look"], state["before"] = state["look"] + 1, n
        return torch.from_numpy(counts)

    return draw


def summarise(runs: list[dict]) -> dict:
    """Accuracy (K, R) and samples, averaged over the repeats."""
    levels = np.arange(len(TARGETS))
    accuracy = np.mean([(run["reached"][..., None] > levels).mean(axis=0) for run in runs], 0)
    samples = [np.broadcast_to(run["samples"], run["reached"].shape[:1]) for run in runs]
    return {
        "accuracy": accuracy,  # (K, R)
        "mean": float(np.mean([s.mean() for s in samples])),
        "median": float(np.mean([np.median(s) for s in samples])),
    }


def table(name: str, result: dict) -> list[str]:
    lines = [
        f"### {name}",
        "",
        "| k | method | " + " | ".join(f"r = {r:g}" for r in TARGETS)
        + " | mean samples | median samples | fewer samples |",
        "|---" * (len(TARGETS) + 5) + "|",
    ]  # fmt: skip
    notes = []
    for key, entry in result.items():
        ks = key.split("+")
        summary = {method: summarise(runs) for method, runs in entry.items()}
        for i, k in enumerate(ks):
            label = f"top-{k}" if len(ks) == 1 else f"top-{k} (1, 3, 5 in one run)"
            for method, s in summary.items():
                cells = " | ".join(f"{100 * v:.1f}%" for v in s["accuracy"][i])
                lines.append(
                    f"| {label} | {method} | {cells} | {s['mean']:,.0f} | {s['median']:,.0f} | "
                    f"{N_MAX / s['mean']:.1f}x |"
                )
        for method, s in summary.items():
            if method != "fixed":
                gap = 100 * (s["accuracy"] - summary["fixed"]["accuracy"]).min()
                notes.append(
                    f"- {method}, k = {key.replace('+', ', ')}: {N_MAX / s['mean']:.1f}x fewer "
                    f"samples, certified accuracy {gap:+.2f} points against fixed n at the worst "
                    "(k, radius)"
                )
    return lines + [""] + notes + [""]


def breakdown(name: str, result: dict) -> list[str]:
    """Where the samples of ``sequential`` go: by the number of targets fixed n certifies."""
    lines = [f"Samples of `sequential` on {name} by the fixed-n outcome (first repeat):", ""]
    lines += ["| k | fixed n certifies | inputs | mean samples | share of all samples |"]
    lines += ["|---|---|---|---|---|"]
    for key in ("1", "3", "5"):
        fixed = result[key]["fixed"][0]["reached"][:, 0]
        samples = result[key]["sequential"][0]["samples"]
        for level in range(len(TARGETS) + 1):
            chosen = fixed == level
            what = "nothing" if level == 0 else f"up to r = {TARGETS[level - 1]:g}"
            if chosen.any():
                lines.append(
                    f"| top-{key} | {what} | {int(chosen.sum())} | "
                    f"{samples[chosen].mean():,.0f} | {samples[chosen].sum() / samples.sum():.0%} |"
                )
    return lines + [""]


def variants(name: str, p: np.ndarray, labels: np.ndarray, repeats: int, seed: int) -> list:
    """The trade-off curve: schedules, bounds, futility levels and budgets compared."""
    plans = {settings: plan(*settings) for settings in VARIANTS}
    result = compare(p, labels, repeats, seed, plans)
    lines = [
        f"Variants on {name} ({repeats} streams per input):",
        "",
        "| bounds | growth | at n_max | futility | budget | fewer samples, k = 1 / 3 / 5 / "
        "all three | loss (points): mean / worst stream |",
        "|---|---|---|---|---|---|---|",
    ]
    for settings in VARIANTS:
        factors, loss, worst = [], 0.0, 0.0
        for key in result:
            runs, fixed = result[key][settings], result[key]["fixed"]
            s, f = summarise(runs), summarise(fixed)
            factors.append(f"{N_MAX / s['mean']:.1f}x")
            loss = min(loss, 100 * (s["accuracy"] - f["accuracy"]).min())
            for run, ref in zip(runs, fixed, strict=True):
                gap = summarise([run])["accuracy"] - summarise([ref])["accuracy"]
                worst = min(worst, 100 * gap.min())
        first, growth, share, futility, budget = settings[:5]
        mixture, correct = (*settings[5:], *(0.0, True)[len(settings) - 5 :])
        bounds = "mixture" if mixture else "union" if correct else "no correction (not valid)"
        spending = f"{share:.3g} of alpha"
        lines.append(
            f"| {bounds} | {growth:g} | {spending} | {futility:g} | {budget:g} | "
            f"{' / '.join(factors)} | {abs(loss):.2f} / {abs(worst):.2f} |"
        )
    return lines + [""]


def clairvoyant(name: str, p: np.ndarray, labels: np.ndarray) -> list[str]:
    """A ceiling: stop each input at the fewest samples (of a fine grid) whose expected counts
    give fixed n's certificates at fixed n's level, knowing the probabilities; together, also
    giving up the costliest certificates, at most 1 % of the inputs per (k, target)."""
    ks, grid = (1, 3, 5), np.unique(np.geomspace(1000, N_MAX, 100).astype(int))

    def certified(n: int) -> np.ndarray:  # (B, K) targets reached by the expected counts
        counts = np.round(p * n).astype(np.int64)  # (B, c)
        return reached(certified_radius(counts, labels, ks, SIGMA, ALPHA).numpy())

    want = certified(N_MAX)
    need = np.full((*want.shape, len(TARGETS) + 1), float(N_MAX))  # (B, K, targets + 1)
    need[..., 0] = grid[0]
    for n in grid[::-1]:
        need[np.arange(len(TARGETS) + 1) <= certified(n)[..., None]] = n
    goal, lost = want.copy(), np.zeros((len(ks), len(TARGETS) + 1), dtype=int)
    while True:  # greedily give up the certificate that saves the most samples
        cost = np.take_along_axis(need, goal[..., None], axis=2)[..., 0]  # (B, K)
        rows = np.argsort(-cost.max(axis=1))[:50]
        best = (0.0, None)
        for b in rows:
            k = int(cost[b].argmax())
            if goal[b, k] and lost[k, goal[b, k]] < 0.01 * len(labels):
                less = goal[b].copy()
                less[k] -= 1
                saved = cost[b].max() - need[b, np.arange(len(ks)), less].max()
                best = max(best, (saved, (b, k)), key=lambda t: t[0])
        if best[1] is None:
            break
        b, k = best[1]
        lost[k, goal[b, k]] += 1
        goal[b, k] -= 1
    alone = [N_MAX / np.take_along_axis(need[:, i], want[:, i, None], 1).mean() for i in range(3)]
    together = N_MAX / np.take_along_axis(need, want[..., None], 2)[..., 0].max(1).mean()
    given_up = N_MAX / cost.max(axis=1).mean()
    return [
        f"Clairvoyant ceiling on {name}: k = 1 / 3 / 5 alone "
        + " / ".join(f"{v:.1f}x" for v in alone)
        + f"; all three {together:.1f}x, {given_up:.1f}x giving up at most 1 % per (k, target)",
        "",
    ]


def digits_counts(args) -> Path:
    """The digits model's counts at n = 10,000: given, or from a fit and a certify run."""
    if args.digits_counts:
        return Path(args.digits_counts)
    work = Path(tempfile.mkdtemp(prefix="sequential_savings_"))
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="offline")
    config = str(REPO / "configs" / "digits.yaml")
    ckpt = args.digits_ckpt
    if ckpt is None:
        print(f"training the digits model in {work} ...", file=sys.stderr, flush=True)
        fit = [sys.executable, "-m", "certify", "fit", "--config", config,
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
        subprocess.run(fit, cwd=work, env=env, check=True, capture_output=True)
        ckpt = str(next(work.glob("runs/**/checkpoints/best-*.ckpt")))
    print(f"certifying the digits test split, n = 10,000, with {ckpt} ...", file=sys.stderr)
    certify = [sys.executable, "-m", "certify", "certify", "--config", config, "--ckpt_path",
               ckpt, "--n", "10000", "--alpha", str(ALPHA), "--output_dir", "counts",
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    subprocess.run(certify, cwd=work, env=env, check=True, capture_output=True)
    return work / "counts" / "counts.txt"


def machine_line() -> str:
    m = machine(torch.device("cpu"))
    return (
        f"{m['date']}, commit {m['commit']}, torch {m['torch']}, {m['cpu']}, "
        f"{m['cores']} CPUs, Python {m['python']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=["cifar10", "digits"])
    parser.add_argument("--digits-counts", help="a count file of the digits model (n = 10,000)")
    parser.add_argument("--digits-ckpt", help="a digits checkpoint to certify (skips the fit)")
    parser.add_argument("--repeats", type=int, default=5, help="streams per input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--variants", action="store_true", help="also compare other schedules")
    args = parser.parse_args()
    sources = {"cifar10": CIFAR_COUNTS}
    if "digits" in args.sources:
        sources["digits"] = digits_counts(args)
    lines = [f"Sequential vs fixed n ({machine_line()}); n_max = {N_MAX:,}, alpha = {ALPHA}, "
             f"sigma = {SIGMA}, {args.repeats} streams per input", ""]  # fmt: skip
    numbers = {}
    for name in args.sources:
        counts, labels = read_counts(sources[name])
        p = counts / counts.sum(axis=1, keepdims=True)
        result = compare(p, labels, args.repeats, args.seed, methods())
        title = f"{name} ({len(labels)} inputs, probabilities from {sources[name].name})"
        lines += table(title, result) + breakdown(name, result)
        if args.variants:
            lines += variants(name, p, labels, args.repeats, args.seed)
            lines += clairvoyant(name, p, labels)
        numbers[name] = {
            key: {m: summarise(runs) for m, runs in entry.items()} for key, entry in result.items()
        }
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, default=lambda a: np.asarray(a).tolist()))


if __name__ == "__main__":
    main()
