"""One block at growing widths: time and peak memory of its factorisation and of its prices,
in-sample and held out, with LAPACK and with torch, and how each grows with the width n.

    python benchmarks/bench_block.py [--n 1024 2048 4096 8192 16384] [--rows_per_unit 2]
                                     [--pricing insample heldout] [--factor lapack torch]

A block of n FFN-like neurons (feeding a Linear(n, 1024)) is fed activations with a decaying
spectrum (n·rows_per_unit rows in 8 batches: more tokens than units), then solved and priced
as pass 1 does it (UnitPruner.neurons: the weight-scaled pivoted ID, in-sample or held-out
prices), each configuration in a fresh process so that one run's freed memory cannot hide
the next one's. Printed per configuration: the seconds of the accumulation, of the
factorisation alone (pivoted_factor on the block's Gram) and of solve() with its prices, the
peak resident memory above the moment the activations are ready in units of one n × n
float64 matrix (n² · 8 bytes), and the log-log slope of each against n.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from efficiency.latency import RssPeak  # noqa: E402
from prune.interpolative import pivoted_factor  # noqa: E402
from prune.units import PRICE_FOLDS, UnitPruner  # noqa: E402

BATCHES = 8


def mixing(n):
    """Activations are Z @ mixing(n), Z Gaussian: a spectrum that decays over three decades."""
    M = torch.randn(n, n, generator=torch.Generator().manual_seed(n)) / n ** 0.5
    return M * torch.logspace(0, -3, n)[:, None]


def child(args):
    torch.manual_seed(0)
    n, held_out = args.n[0], args.child == "heldout"
    linear = torch.nn.Linear(n, args.out)
    rows = n * args.rows_per_unit // BATCHES
    M = mixing(n)
    # the activations are ready before the measurement starts and live through it, as a layer's do: they are
    # not the block's memory (made inside it, the allocator kept up to 0.9 n² of their freed temporaries at n = 4096)
    batches = [torch.randn(rows, n, generator=torch.Generator().manual_seed(b)) @ M for b in range(BATCHES)]
    del M
    result = {"accumulate_s": 0.0}
    with RssPeak() as peak:
        pruner = UnitPruner.neurons(linear, price_folds=PRICE_FOLDS if held_out else 0, factor=args.factor[0])
        for b, A in enumerate(batches):
            start = time.perf_counter()
            pruner.add_batch(A, fold=b % PRICE_FOLDS if held_out else 0)
            result["accumulate_s"] += time.perf_counter() - start
        if args.factor_only:
            G = pruner.grams[0].products.clone()
            start = time.perf_counter()
            pivoted_factor(G, factor=args.factor[0], overwrite=True)
            result["factor_s"] = time.perf_counter() - start
            del G
        start = time.perf_counter()
        pruner.solve()
        pruner.prices()
        result["solve_s"] = time.perf_counter() - start
    result["peak_mb"] = peak.peak_mb
    print(json.dumps(result))


def slope(xs, ys):
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--rows_per_unit", type=int, default=2, help="calibration rows per unit of the block")
    p.add_argument("--out", type=int, default=1024, help="outputs of the consumer")
    p.add_argument("--pricing", nargs="+", default=["insample", "heldout"], choices=["insample", "heldout"])
    p.add_argument("--factor", nargs="+", default=["lapack", "torch"], choices=["lapack", "torch"])
    p.add_argument("--child", choices=["insample", "heldout"], help=argparse.SUPPRESS)
    p.add_argument("--factor_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print(f"one block of n units, {args.rows_per_unit}·n rows in {BATCHES} batches, consumer out {args.out}; "
          f"memory in n x n float64 matrices above the activations; {torch.get_num_threads()} threads")
    print(f"{'factor':>7} {'pricing':>9} {'n':>6}  {'accumulate s':>12} {'factor s':>9} {'solve s':>8} "
          f"{'peak MB':>8} {'/ n^2':>6}")
    series = {}
    for factor in args.factor:
        for pricing in args.pricing:
            for n in args.n:
                command = [sys.executable, __file__, "--child", pricing, "--n", str(n), "--factor", factor,
                           "--rows_per_unit", str(args.rows_per_unit), "--out", str(args.out)]
                if pricing == "insample":
                    command.append("--factor_only")
                r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                matrix_mb = n * n * 8 / 2**20
                print(f"{factor:>7} {pricing:>9} {n:>6}  {r['accumulate_s']:>12.1f} "
                      f"{r.get('factor_s', float('nan')):>9.2f} {r['solve_s']:>8.2f} {r['peak_mb']:>8.0f} "
                      f"{r['peak_mb'] / matrix_mb:>6.1f}", flush=True)
                series.setdefault((factor, pricing), []).append((n, r))
    print("\nlog-log slope against n (3 = cubic):")
    for (factor, pricing), points in series.items():
        ns = [n for n, _ in points]
        if len(ns) < 2:
            continue
        parts = [f"solve {slope(ns, [r['solve_s'] for _, r in points]):.2f}",
                 f"peak memory {slope(ns, [r['peak_mb'] for _, r in points]):.2f}",
                 f"accumulate {slope(ns, [r['accumulate_s'] for _, r in points]):.2f}"]
        if pricing == "insample":
            parts.insert(0, f"factor {slope(ns, [r['factor_s'] for _, r in points]):.2f}")
        print(f"  {factor} {pricing}: " + ", ".join(parts))


if __name__ == "__main__":
    main()
