"""Benchmark the memory of pricing one block: pass 1's Gram, ID and prices for the widest block.

    python benchmarks/bench_block_memory.py [--n 4096 --out 1024 --batches 8 --rows 1024]

One FFN-like block (n neurons feeding a Linear(n, out)) is fed `batches` batches of `rows`
random activations, then solved and priced the way pass 1 does it (UnitPruner.neurons: the
weight-scaled pivoted ID and its prices()), once per pricing, each in a fresh
process so that one run's freed memory cannot hide the next one's. Printed: the peak resident
memory above the moment the activations are ready (the Grams' accumulation included), in MB
and in units of one n × n float64 matrix (n² · 8 bytes), and the time. In-sample prices hold
the Gram and its factor; held-out prices hold one Gram per fold and factor each fold in turn.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from efficiency.latency import RssPeak  # noqa: E402
from prune.units import PRICE_FOLDS, UnitPruner  # noqa: E402

PRICINGS = ("insample", "heldout")


def activations(args):
    """Batches of rows with a decaying spectrum, as FFN activations have (not white noise)."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(args.n, args.n, generator=generator) / args.n ** 0.5
    mixing *= torch.logspace(0, -3, args.n)[:, None]
    return [torch.randn(args.rows, args.n, generator=generator) @ mixing for _ in range(args.batches)]


def child(args):
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.n, args.out)
    batches = activations(args)
    held_out = args.child == "heldout"
    with RssPeak() as peak:
        start = time.perf_counter()
        pruner = UnitPruner.neurons(linear, held_out_prices=held_out)
        for b, A in enumerate(batches):
            pruner.add_batch(A, fold=b % PRICE_FOLDS if held_out else 0)
        pruner.solve()
        pruner.prices()
        seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": peak.peak_mb, "seconds": seconds}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="units of the block (the Gram is n × n)")
    p.add_argument("--out", type=int, default=1024, help="outputs of the consumer")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rows", type=int, default=1024, help="tokens per batch")
    p.add_argument("--child", choices=PRICINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    matrix_mb = args.n ** 2 * 8 / 2**20
    print(f"block of {args.n} units, consumer out {args.out}, {args.batches} batches of {args.rows} rows; "
          f"one n x n float64 matrix = {matrix_mb:.0f} MB")
    print(f"{'pricing':>9}  {'peak MB':>8}  {'/ n^2':>6}  {'seconds':>7}")
    for pricing in PRICINGS:
        command = [sys.executable, __file__, "--child", pricing, "--n", str(args.n), "--out", str(args.out),
                   "--batches", str(args.batches), "--rows", str(args.rows)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"{pricing:>9}  {result['peak_mb']:>8.0f}  {result['peak_mb'] / matrix_mb:>6.1f}  "
              f"{result['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
