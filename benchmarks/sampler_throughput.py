"""Sampler throughput against the base model's own forward pass.

For every model, on one device and one batch size, the script measures:

(a) the model's pure forward throughput (noisy samples per second: forward + argmax on a
    pre-made batch), at the fastest batch size of a sweep and at the sampler's automatic one;
(b) ``SmoothedClassifier.sample_counts`` throughput on a set of inputs, for several n;
(c) a one-input-per-batch loop in the style of the original implementations (repeat the
    image, add noise, forward, argmax, copy to the host, count on the host), at (b)'s batch
    size capped at n, on as many of the inputs as it gets through in ``--seconds``;
(d) ``certified_radius`` time for 10,000 examples x 1,000 classes, k in {1, 3, 5};

then prints a table with the ratios (b)/(a) and (b)/(c) and writes it as JSON. Every round
measures (a) in increasing batch size, (c), (b), then (c) and (a) again in reverse order; a
round's (a) and (c) are the means of their two measurements, taken symmetrically around (b),
so that a linear drift of the machine's speed cancels out of (b)/(a) and (b)/(c).
Throughputs are the best of ``--repeats`` rounds, and each ratio is the median over rounds of
the ratio within a round, so that a machine whose speed drifts between rounds (a shared
virtual machine) does not decide it. On a CPU the script first prints what drawing one batch's
noise costs against its forward pass.

On a CPU the script runs with glibc's malloc keeping freed memory in the process
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``, see
docs/performance.md): it starts itself again with these variables when none of glibc's malloc
variables is set. ``--default-malloc`` measures glibc's defaults instead. The JSON records the
date, the commit, the machine and the malloc settings.

    python benchmarks/sampler_throughput.py                       # CPU: digits CNN, ResNet-20/110
    python benchmarks/sampler_throughput.py --device cuda         # + ResNet-50 at 224x224
    python benchmarks/sampler_throughput.py --models cifar_resnet110 resnet50 --device cuda
    bash benchmarks/gpu_check.sh OUTDIR       # CUDA tests + default, fast and compiled runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    MALLOC_SETTINGS,
    MALLOC_VARIABLES,
    MODELS,
    clean_run,
    forward_rate,
    machine,
    noise_cost,
    noise_line,
    one_input_per_batch,
    sweep_forward,
    synchronize,
)
from certify import SmoothedClassifier, certified_radius  # noqa: E402
from certify.sampling.batching import clear_batch_size_cache  # noqa: E402

SIGMA = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--n", nargs="+", type=int, default=[100, 1000, 10_000])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="work per measurement")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="skip longer (b)/(c)")
    parser.add_argument("--batch-size", type=int, help="explicit sampler batch size")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], help="forward precision")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--freezing",
        action="store_true",
        help="with --compile: inductor freezing (weights become constants, BN folded into convs)",
    )
    parser.add_argument(
        "--idle-wait", type=float, default=30.0, help="CPU: wait up to S s for idle CPUs"
    )
    parser.add_argument(
        "--tries", type=int, default=4, help="CPU: tries per measurement to get one without load"
    )
    parser.add_argument("--skip-radius", action="store_true", help="skip (d)")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU: keep glibc's default malloc settings (see the module docstring)",
    )
    parser.add_argument("--json", type=Path, help="output (default benchmarks/results/...)")
    return parser.parse_args(argv)


def options(args) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    return {
        "autocast_dtype": dtype,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
    }


def bench_model(name: str, args, device: torch.device) -> list[dict]:
    spec = MODELS[name]
    model = spec.build().to(device).eval()
    smoothed = SmoothedClassifier(model, spec.num_classes, SIGMA, **options(args))
    forward = smoothed._forward  # the sampler's own forward pass: same options as (b)
    auto, tuning = _tune(smoothed, spec, args, device)
    batch = args.batch_size or auto
    sweep = sweep_forward(
        forward, model, spec.shape, device, args.seconds / 3, lambda fn: _clean(fn, args, device)
    )
    # (a) is re-measured in every round at the sweep's 3 fastest sizes and the sampler's own.
    sizes = sorted({*sorted(sweep, key=sweep.get)[-3:], batch})
    print(
        f"\n{name}: auto batch size {auto} (tuned in {tuning:.2f} s), sweep of (a): "
        + ", ".join(f"{b}: {r:,.0f}/s" for b, r in sweep.items()),
        flush=True,
    )
    cost = None
    if device.type == "cpu":
        cost = noise_cost(smoothed._forward, spec.shape, batch, SIGMA, 10 * args.seconds)
    if cost is not None:
        print("  " + noise_line(cost), flush=True)
    rows = []
    for n in args.n:
        top = max(sweep.values())
        inputs = max(1, math.ceil(top * args.seconds / n))
        if n / top > args.max_seconds:
            print(f"  n={n}: skipped (one input takes {n / top:.0f} s at (a)'s rate)")
            continue
        x = spec.inputs(inputs, device)  # (inputs, *shape) in [0, 1]
        rounds, busy = _best_of_rounds(args, device, smoothed, spec, x, n, sizes, batch)
        best = {"a": {size: max(map(max, r)) for size, r in rounds["a"].items()}}
        best["b"], best["c"] = max(rounds["b"]), max(map(max, rounds["c"]))
        # (a) and (c) of a round: the mean of their measurements before and after (b)
        around_b = {size: [statistics.mean(p) for p in r] for size, r in rounds["a"].items()}
        c_around_b = [statistics.mean(p) for p in rounds["c"]]
        # The fastest size by its median round (a best-of favours whichever size got lucky).
        fastest = max(around_b, key=lambda size: statistics.median(around_b[size]))
        row = {
            "model": name,
            "input_shape": list(spec.shape),
            "n": n,
            "inputs": inputs,
            "batch_size": batch,
            "auto_batch_size": auto,
            "tuning_s": tuning,
            "sweep": sweep,
            "a_by_batch_size": best["a"],
            "fastest_batch_size": fastest,
            "a_fastest": best["a"][fastest],
            "a_same_batch": best["a"][batch],
            "b": best["b"],
            "c": best["c"],
            "b_over_a": _paired_ratio(rounds["b"], around_b[fastest]),
            "b_over_c": _paired_ratio(rounds["b"], c_around_b),
            "b_over_a_same_batch": _paired_ratio(rounds["b"], around_b[batch]),
            "b_over_a_best_of": best["b"] / best["a"][fastest],
            "b_over_c_best_of": best["b"] / best["c"],
            "rounds": {"a": rounds["a"], "b": rounds["b"], "c": rounds["c"]},
            "measurements_under_load": busy,
            "noise_cost_ms": cost,
        }
        if device.type == "cuda":
            row["b_peak_memory_mb"] = _peak_memory(smoothed, x, n, args.batch_size, device)
        print(
            f"  n={n:>6} x{inputs:<4} (a) {row['a_fastest']:>9,.0f}/s @{fastest:<5}"
            f" (b) {row['b']:>9,.0f}/s @{batch:<5} (c) {row['c']:>9,.0f}/s"
            f"  (b)/(a) {row['b_over_a']:.3f}  (b)/(c) {row['b_over_c']:.2f}",
            flush=True,
        )
        rows.append(row)
    return rows


def _tune(smoothed, spec, args, device) -> tuple[int, float]:
    """The sampler's automatic batch size and its tuning time, from a run on idle CPUs."""
    result = {}

    def tune() -> float:
        clear_batch_size_cache()
        start = time.perf_counter()
        result["auto"] = smoothed.auto_batch_size(spec.shape)
        result["seconds"] = time.perf_counter() - start
        return 0.0  # clean_run keeps retrying until one run was clean; the last one counts

    clean_run(tune, device, args.tries, args.idle_wait)
    return result["auto"], result["seconds"]


def _clean(fn, args, device) -> float:
    return clean_run(fn, device, args.tries, args.idle_wait)[0]


def _best_of_rounds(args, device, smoothed, spec, x, n, sizes, batch):
    """Interleaved rounds: (a) at each size in ``sizes``, (c), (b), (c) again, (a) again.

    (a) is measured before (b) in increasing size and after it in decreasing size, and (c)
    just before and just after (b), so each of them is measured symmetrically around (b) and a
    linear drift of the machine's speed cancels out of (b)/(a) and (b)/(c). Every measurement
    is retried (``--tries``) until other processes left the CPUs alone. Returns ``({"a": {size:
    [[before, after] per round]}, "b": [rate per round], "c": [[before, after] per round]},
    measurements never clean)``.
    """
    forward, model = smoothed._forward, smoothed.model
    measures = {
        ("a", size): partial(forward_rate, forward, size, x, args.seconds) for size in sizes
    }
    measures["b"] = lambda: _sampler_rate(smoothed, x, n, args.batch_size, batch, device)
    measures["c"] = lambda: _baseline_rate(model, spec, x, n, batch, device, args.seconds)
    around = [("a", s) for s in sizes] + ["c"]
    order = around + ["b"] + around[::-1]
    rounds, busy = {key: [] for key in measures}, 0
    for _ in range(args.repeats):
        for key in order:
            rate, clean = clean_run(measures[key], device, args.tries, args.idle_wait)
            rounds[key].append(rate)
            busy += not clean

    def pairs(key) -> list[list[float]]:
        return [rounds[key][i : i + 2] for i in range(0, 2 * args.repeats, 2)]

    a = {size: pairs(("a", size)) for size in sizes}
    return {"a": a, "b": rounds["b"], "c": pairs("c")}, busy


def _paired_ratio(top: list[float], bottom: list[float]) -> float:
    """Median over rounds of ``top[r] / bottom[r]``: measured seconds apart, so the drift of a
    machine whose speed changes from one second to the next (a shared virtual machine's can
    reach 20 %) cancels out."""
    return statistics.median(t / b for t, b in zip(top, bottom, strict=True))


def restart_with_malloc_settings(args) -> None:
    """On a glibc CPU run, start this script again with ``MALLOC_SETTINGS`` in its environment
    (glibc reads them only at start-up), unless ``--default-malloc`` or the user set any of
    glibc's malloc variables. Returns only where nothing is to be done."""
    if args.default_malloc or torch.device(args.device).type != "cpu":
        return
    if any(name in os.environ for name in MALLOC_VARIABLES) or platform.libc_ver()[0] != "glibc":
        return
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, **MALLOC_SETTINGS})


def _sampler_rate(smoothed, x, n, batch_size, batch, device) -> float:
    # Untimed warm-up of one batch, as (a) has: every measurement starts after an idle wait
    # (``clean_run``), and a cold first batch would be charged to (b) alone.
    smoothed.sample_counts(x[:1], min(n, batch), batch_size=batch_size, seed=1)
    synchronize(device)
    start = time.perf_counter()
    smoothed.sample_counts(x, n, batch_size=batch_size, seed=0)
    synchronize(device)  # the last batch has finished before the clock stops
    return x.shape[0] * n / (time.perf_counter() - start)


def _baseline_rate(model, spec, x, n, batch_size, device, seconds) -> float:
    """(c) on as many of the inputs as it gets through in ``seconds`` (at least one): it
    handles one input at a time, so a slow baseline need not run over all of them."""
    one_input_per_batch(model, x[:1], min(n, batch_size), batch_size, SIGMA, spec.num_classes)
    synchronize(device)  # after an untimed warm-up batch, as (a) and (b) have
    start, done = time.perf_counter(), 0
    while done < x.shape[0] and (done == 0 or time.perf_counter() - start < seconds):
        one_input_per_batch(model, x[done : done + 1], n, batch_size, SIGMA, spec.num_classes)
        done += 1  # one_input_per_batch copies its counts to the host: nothing is in flight
    return done * n / (time.perf_counter() - start)


def _peak_memory(smoothed, x, n, batch_size, device) -> float:
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    smoothed.sample_counts(x, n, batch_size=batch_size, seed=0)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def table(rows: list[dict], radius: dict) -> str:
    """The results as a Markdown table (samples per second)."""
    lines = [
        "| model | input | n | inputs | batch (b), (c) | (a) fastest @ batch | (a) @ (b)'s batch"
        " | (b) sampler | (c) one input per batch | (b)/(a) | (b)/(a) same batch | (b)/(c) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        lines.append(
            f"| {r['model']} | {shape} | {r['n']:,} | {r['inputs']} | {r['batch_size']} "
            f"| {r['a_fastest']:,.0f} @ {r['fastest_batch_size']} | {r['a_same_batch']:,.0f} "
            f"| {r['b']:,.0f} | {r['c']:,.0f} | {r['b_over_a']:.3f} "
            f"| {r['b_over_a_same_batch']:.3f} | {r['b_over_c']:.2f} |"
        )
    lines.append(
        "\nThroughputs: best of the rounds. Ratios: median over rounds of the ratio within a"
        " round (best-of ratios are in the JSON)."
    )
    if radius:
        times = ", ".join(f"{k}: {s:.3f} s" for k, s in radius.items())
        lines.append(f"\n(d) certified_radius, 10,000 examples x 1,000 classes: {times}")
    return "\n".join(lines)


def bench_radius(args) -> dict:
    """(d): ``certified_radius`` on 10,000 x 1,000 counts (n = 100,000), k in {1, 3, 5}."""
    rng = np.random.default_rng(0)
    examples, classes, n = 10_000, 1_000, 100_000
    probs = rng.dirichlet(np.full(classes, 0.05), size=examples)  # (E, c) peaked
    counts = rng.multinomial(n, probs)  # (E, c)
    labels = counts.argmax(axis=1)  # (E,)
    certified_radius(counts[:100], labels[:100], (1, 3, 5), SIGMA, 0.001)  # warm-up
    cpu = torch.device("cpu")
    times = {}
    for top_k in ((1,), (3,), (5,), (1, 3, 5)):

        def rate(top_k=top_k) -> float:  # calls per second
            start = time.perf_counter()
            certified_radius(counts, labels, top_k, SIGMA, 0.001)
            return 1.0 / (time.perf_counter() - start)

        best = max(clean_run(rate, cpu, args.tries, args.idle_wait)[0] for _ in range(args.repeats))
        times["k=" + ",".join(map(str, top_k))] = 1.0 / best
    print(
        "\n(d) certified_radius, 10,000 examples x 1,000 classes: "
        + ", ".join(f"{k}: {s:.3f} s" for k, s in times.items())
    )
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.freezing:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    info = machine(device)
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    path = args.json or Path(__file__).parent / "results" / f"sampler_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in options(args).items()}
    settings.update(cudnn_benchmark=str(args.cudnn_benchmark), freezing=str(args.freezing))
    result = {"machine": info, "options": settings}
    print("options:", settings)
    result.update(rows=[], certified_radius_s={}, notes=[])
    for name in args.models:
        if MODELS[name].gpu_only and device.type != "cuda":
            result["notes"].append(f"{name}: skipped, GPU only (224x224 ImageNet model)")
            print(f"\n{result['notes'][-1]}")
            continue
        result["rows"] += bench_model(name, args, device)
        path.write_text(json.dumps(result, indent=1))  # what is done so far, should a limit hit
    if not args.skip_radius:
        result["certified_radius_s"] = bench_radius(args)
    print("\n" + table(result["rows"], result["certified_radius_s"]))
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path} ({platform.node()})")


if __name__ == "__main__":
    restart_with_malloc_settings(parse_args())  # the command line's own process only
    main()
