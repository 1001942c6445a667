"""Benchmark STAT on a real decoder: SmolLM2-135M (Llama-family, grouped-query attention).

    python benchmarks/bench_opt.py [--mus 0.95 0.9 0.8 0.7] [--nsamples 32 --seqlen 512 --eval_windows 40]

Calibration on emma + mansfieldpark, perplexity on prideprejudice (the `austen` task). Prints
the perplexity of `stat` and `magnitude` at each μ next to dense; the pruning wall time over
the time of one dense forward pass over the same calibration windows (target ≤ 3); and the
peak memory of a pruning run, measured in a fresh process, against the dense model's size plus
three times one layer's activations (the calibration hidden states).
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import lm  # noqa: E402
from efficiency.macs import adapter_costs, model_macs, shape_of  # noqa: E402
from evaluate.perplexity import perplexity  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from prune.pipeline import stat_prune  # noqa: E402
from scripts.convert_smollm2 import DEFAULT_OUT, convert  # noqa: E402


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration(tokenizer, args):
    windows = lm.calibration_windows("austen", tokenizer, args.nsamples, args.seqlen, seed=0)
    return [{"input_ids": windows[i:i + args.batch_size]} for i in range(0, len(windows), args.batch_size)]


def memory_probe(args):
    """In a fresh process: the memory that loading and pruning take, nothing else."""
    model_dir = convert(DEFAULT_OUT)
    tokenizer = load_tokenizer(model_dir)
    batches = calibration(tokenizer, args)
    before = rss_mb()
    model = load_model(model_dir)
    adapter = adapter_for(model)
    stat_prune(model, adapter, batches, adapter_costs(adapter, args.seqlen), 0.9, "cpu", progress=False)
    config = model.config
    print(json.dumps({
        "peak_mb": rss_mb() - before,
        "model_mb": sum(p.numel() * p.element_size() for p in load_model(model_dir).parameters()) / 2**20,
        "activations_mb": args.nsamples * args.seqlen * config.hidden_size * 4 / 2**20,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mus", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7])
    p.add_argument("--methods", nargs="+", default=["stat", "magnitude"])
    p.add_argument("--allocation", default="greedy")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--memory_probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.memory_probe:
        return memory_probe(args)

    model_dir = convert(DEFAULT_OUT)
    tokenizer = load_tokenizer(model_dir)
    dense = load_model(model_dir)
    adapter = adapter_for(dense)
    costs = adapter_costs(adapter, args.seqlen)
    dense_macs = model_macs(*shape_of(dense, adapter), costs)
    batches = calibration(tokenizer, args)
    windows = lm.eval_windows(lm.eval_tokens("austen", tokenizer)["prideprejudice"], args.seqlen,
                              args.eval_windows)
    with torch.no_grad():
        start = time.perf_counter()
        for batch in batches:
            dense(**batch, use_cache=False)
        forward_seconds = time.perf_counter() - start
    dense_ppl = perplexity(dense, adapter, windows, "cpu", args.batch_size, progress=False)
    print(f"SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} tokens (emma + mansfieldpark, seed 0), "
          f"perplexity on the first {len(windows)} windows of {args.seqlen} tokens of prideprejudice; "
          f"allocation {args.allocation}")
    print(f"dense perplexity {dense_ppl:.3f}; one dense forward pass over the calibration windows "
          f"{forward_seconds:.1f} s", flush=True)

    rows, seconds = [], {m: [] for m in args.methods}
    for mu in args.mus:
        row = {}
        for method in args.methods:
            model = copy.deepcopy(dense)
            result = stat_prune(model, adapter, batches, costs, mu, "cpu", method=method,
                                allocation=args.allocation, progress=False)
            ratio = model_macs(result.heads, result.neurons, costs) / dense_macs
            row[method] = perplexity(model, adapter, windows, "cpu", args.batch_size, progress=False)
            seconds[method].append(result.seconds)
            print(f"  mu {mu:.2f} {method:>9}: perplexity {row[method]:.3f} ({row[method] / dense_ppl - 1:+.1%}), "
                  f"MACs {ratio:.4f}, KV groups {result.heads}, prune {result.seconds:.1f} s", flush=True)
        rows.append((mu, row))

    print(f"\nperplexity on prideprejudice (dense {dense_ppl:.3f})")
    print(f"{'mu':>5}  " + "  ".join(f"{m:>16}" for m in args.methods))
    for mu, row in rows:
        print(f"{mu:>5.2f}  " + "  ".join(f"{row[m]:>8.3f} ({row[m] / dense_ppl - 1:+6.1%})" for m in args.methods))
    print("\npruning wall time / one dense forward pass over the calibration windows (target <= 3):")
    for method, values in seconds.items():
        print(f"  {method:>9}: {sum(values) / len(values) / forward_seconds:.2f}")

    probe = subprocess.run([sys.executable, __file__, "--memory_probe", "--nsamples", str(args.nsamples),
                            "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size)],
                           capture_output=True, text=True, check=True)
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    bound = memory["model_mb"] + 3 * memory["activations_mb"]
    print(f"peak memory of loading + pruning at mu 0.9 (fresh process, RSS growth): {memory['peak_mb']:.0f} MB; "
          f"target: below model {memory['model_mb']:.0f} MB + 3 x activations {memory['activations_mb']:.0f} MB "
          f"= {bound:.0f} MB")


if __name__ == "__main__":
    main()
