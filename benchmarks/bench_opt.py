"""Benchmark STAT on a real decoder: SmolLM2-135M (Llama-family, grouped-query attention).

    python benchmarks/bench_opt.py [--mus 0.95 0.9 0.8 0.7] [--nsamples 32 --seqlen 512 --eval_windows 40]

Calibration on emma + mansfieldpark, perplexity on prideprejudice (the `austen` task). Prints
the perplexity of `stat` and `magnitude` at each μ next to dense; the pruning wall time over
the time of one dense forward pass over the same calibration windows (target ≤ 3); and the
peak memory of a pruning run above the loaded model, measured in a fresh process, against
three times one layer's activations (the calibration hidden states).

A variant may also be a protocol's name (`improved`, `paper`): every knob as `prune_opt.py
--protocol <name>` sets it (pipelines/protocol.py), its MAC split included; the calibration
corpus stays austen, offline.
"""
import argparse
import copy
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import lm  # noqa: E402
from efficiency.latency import RssPeak, forward_seconds as dense_forward_seconds  # noqa: E402
from efficiency.macs import AUTHORS_NEURON_SHARE, adapter_costs, mac_ratios, unit_prices  # noqa: E402
from evaluate.perplexity import perplexity  # noqa: E402
from pipelines import protocol  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from prerequisites.layerwise import release_memory  # noqa: E402
from prune.stat import stat_prune  # noqa: E402
from scripts.convert_smollm2 import DEFAULT_OUT, convert  # noqa: E402


def calibration(tokenizer, args):
    windows = lm.calibration_windows("austen", tokenizer, args.nsamples, args.seqlen, seed=0)
    return lm.window_batches(windows, args.batch_size)


def memory_probe(args):
    """In a fresh process: the memory that loading and pruning take, nothing else."""
    model_dir = convert(DEFAULT_OUT)
    tokenizer = load_tokenizer(model_dir)
    batches = calibration(tokenizer, args)
    model = load_model(model_dir)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    adapter = adapter_for(model)
    with torch.no_grad():  # the runtime's one-off buffers (BLAS, oneDNN) come with any forward pass
        model(**batches[0], use_cache=False)
    release_memory()
    with RssPeak() as memory:  # above the loaded, warmed-up model: what pruning itself takes
        stat_prune(model, adapter, batches, adapter_costs(adapter, args.seqlen), 0.9, "cpu", progress=False)
    config = model.config
    print(json.dumps({
        "peak_mb": memory.peak_mb,
        "model_mb": model_mb,
        "activations_mb": args.nsamples * args.seqlen * config.hidden_size * 4 / 2**20,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mus", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7])
    p.add_argument("--variants", nargs="+", default=["stat/ffn_greedy", "stat/greedy", "magnitude/ffn_greedy", "paper"],
                   help="method/allocation (the first is prune_opt.py's default), or a protocol: improved, paper")
    p.add_argument("--skip_memory", action="store_true", help="leave out the memory probes (two fresh processes)")
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
    prices = unit_prices(adapter, adapter.shape(dense), args.seqlen, "decoder")
    batches = calibration(tokenizer, args)
    windows = lm.eval_windows(lm.eval_tokens("austen", tokenizer)["prideprejudice"], args.seqlen,
                              args.eval_windows)
    forward_seconds = dense_forward_seconds(dense, batches, repeats=2, use_cache=False)
    dense_ppl = perplexity(dense, adapter, windows, "cpu", args.batch_size, progress=False)
    print(f"SmolLM2-135M, calibration {args.nsamples} x {args.seqlen} tokens (emma + mansfieldpark, seed 0), "
          f"perplexity on the first {len(windows)} windows of {args.seqlen} tokens of prideprejudice")
    print(f"dense perplexity {dense_ppl:.3f}; one dense forward pass over the calibration windows "
          f"{forward_seconds:.1f} s", flush=True)

    rows, seconds = [], {v: [] for v in args.variants}
    for mu in args.mus:
        row = {}
        for variant in args.variants:
            if variant in protocol.PROTOCOLS:
                knobs = protocol.resolve(argparse.Namespace(protocol=variant), protocol.DECODER)
                method, split = "stat", knobs["mac_split"]
                options = {k: knobs[k] for k in ("allocation", "calibration", "score_fraction", "pricing")}
            else:
                method, allocation = variant.split("/")
                split, options = "exact", {"allocation": allocation}
            share = AUTHORS_NEURON_SHARE["decoder"] if split == "authors" else None
            model = copy.deepcopy(dense)
            result = stat_prune(model, adapter, batches, prices[split], mu, "cpu", method=method, neuron_share=share,
                                progress=False, **options)
            exact, authors = mac_ratios(prices, adapter.shape(dense), (result.attn_units, result.neurons))
            row[variant] = perplexity(model, adapter, windows, "cpu", args.batch_size, progress=False)
            seconds[variant].append(result.seconds)
            print(f"  mu {mu:.2f} {variant:>20}: perplexity {row[variant]:.3f} ({row[variant] / dense_ppl - 1:+.1%}), "
                  f"MACs {exact:.4f} (authors' split {authors:.4f}), KV groups {result.attn_units}, "
                  f"prune {result.seconds:.1f} s", flush=True)
        rows.append((mu, row))

    print(f"\nperplexity on prideprejudice (dense {dense_ppl:.3f}); method/allocation")
    print(f"{'mu':>5}  " + "  ".join(f"{v:>22}" for v in args.variants))
    for mu, row in rows:
        print(f"{mu:>5.2f}  " + "  ".join(f"{row[v]:>12.3f} ({row[v] / dense_ppl - 1:+7.1%})" for v in args.variants))
    print("\npruning wall time / one dense forward pass over the calibration windows (target <= 3):")
    for variant, values in seconds.items():
        print(f"  {variant:>20}: {sum(values) / len(values) / forward_seconds:.2f}")
    if args.skip_memory:
        return

    def probe(**env):
        run = subprocess.run([sys.executable, __file__, "--memory_probe", "--nsamples", str(args.nsamples),
                              "--seqlen", str(args.seqlen), "--batch_size", str(args.batch_size)],
                             capture_output=True, text=True, check=True, env={**os.environ, **env})
        return json.loads(run.stdout.strip().splitlines()[-1])

    memory = probe()
    # glibc keeps freed blocks for reuse, so resident memory overstates what is alive; with
    # every block over 1 MiB mapped and unmapped on its own, it tracks the live tensors.
    live = probe(MALLOC_MMAP_THRESHOLD_="1048576")
    bound = 3 * memory["activations_mb"]
    print(f"peak memory of pruning at mu 0.9 (fresh process), above the loaded model ({memory['model_mb']:.0f} MB):")
    print(f"  resident: {memory['peak_mb']:.0f} MB; with freed memory returned at once "
          f"(MALLOC_MMAP_THRESHOLD_=1 MiB): {live['peak_mb']:.0f} MB")
    print(f"  target: below 3 x one layer's activations (the calibration hidden states, "
          f"{memory['activations_mb']:.0f} MB) = {bound:.0f} MB")


if __name__ == "__main__":
    main()
