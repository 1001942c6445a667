"""Benchmark GPTQ, alone and after STAT pruning, on the real SmolLM2-135M (Llama, tied embeddings).

    python benchmarks/bench_gptq.py [--nsamples 32] [--seqlen 512] [--eval_windows 40] [--mu 0.9] [--wbits 4]
                                    [--threads N]

Calibration: --nsamples random windows of emma + mansfieldpark (the austen task, seed 0), shared
by the pruning and every quantization. Evaluation: perplexity on the first --eval_windows
windows of prideprejudice (GPTQ protocol, windows of --seqlen tokens). For each variant it
prints the perplexity, the size on disk of its checkpoint (saved to a temporary folder: dense
and pruned as safetensors floats, quantized as packed codes with float32 scales) and the time
its pruning and quantization took. Defaults take about a quarter of an hour on 2 CPU cores (--threads 1
when they are shared).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import lm  # noqa: E402
from efficiency.latency import peak_memory_mb  # noqa: E402
from efficiency.macs import adapter_costs, count_parameters  # noqa: E402
from evaluate.perplexity import perplexity  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer, save_pruned  # noqa: E402
from prune.stat import stat_prune  # noqa: E402
from quantize.sequential import quantize_model  # noqa: E402
from quantize.storage import save_quantized, weights_size_mb  # noqa: E402
from scripts.convert_smollm2 import convert  # noqa: E402


def saved_size_mb(save):
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        return weights_size_mb(folder)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length")
    p.add_argument("--eval_windows", type=int, default=40, help="evaluation windows of prideprejudice")
    p.add_argument("--mu", type=float, default=0.9, help="STAT MAC budget")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int,
                   help="CPU threads (default: torch's choice); on a machine shared with other jobs one thread "
                        "can be much faster, as GPTQ's column loop runs many small operations")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model_dir = convert()
    tokenizer = load_tokenizer(model_dir)
    dense = load_model(model_dir)
    adapter = adapter_for(dense)
    windows = lm.eval_windows(lm.eval_tokens("austen", tokenizer)["prideprejudice"], args.seqlen, args.eval_windows)
    ids = lm.calibration_windows("austen", tokenizer, args.nsamples, args.seqlen, seed=0)
    batches = lm.window_batches(ids, args.batch_size)
    print(f"SmolLM2-135M ({count_parameters(dense) / 1e6:.1f}M parameters, float32), device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"calibration: {args.nsamples} x {args.seqlen} tokens of emma + mansfieldpark (seed 0); "
          f"evaluation: prideprejudice, first {len(windows)} windows of {args.seqlen} tokens")
    print(f"GPTQ: asymmetric, percdamp 0.01, no act_order; STAT: mu {args.mu}, default allocation of stat_prune\n")

    rows = []

    def report(name, model, size_mb, prune_s=None, quantize_s=None):
        ppl = perplexity(model, adapter, windows, device, args.batch_size, progress=False)
        rows.append((name, ppl, size_mb, prune_s, quantize_s))
        print(f"  done: {name}: perplexity {ppl:.3f}", flush=True)

    def quantized(base, **settings):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        packed = quantize_model(model, adapter, batches, device, args.wbits, progress=False, **settings)
        seconds = time.perf_counter() - start
        size = saved_size_mb(lambda folder: save_quantized(model, packed, folder, settings=settings))
        return model, size, seconds

    report("dense", dense, saved_size_mb(dense.save_pretrained))
    b = args.wbits
    for name, settings in ((f"RTN {b}-bit, per row", dict(nearest=True)),
                           (f"RTN {b}-bit, groupsize 128", dict(nearest=True, groupsize=128)),
                           (f"GPTQ {b}-bit, groupsize 128", dict(groupsize=128)),
                           (f"GPTQ {b}-bit, per row", dict())):
        model, size, seconds = quantized(dense, **settings)
        report(name, model, size, quantize_s=seconds)
        del model

    pruned = copy.deepcopy(dense)
    start = time.perf_counter()
    stat_prune(pruned, adapter, batches, adapter_costs(adapter, args.seqlen), args.mu, device, progress=False)
    prune_seconds = time.perf_counter() - start
    report(f"STAT mu {args.mu}", pruned, saved_size_mb(lambda folder: save_pruned(pruned, folder)),
           prune_s=prune_seconds)
    model, size, seconds = quantized(pruned, groupsize=128)
    report(f"STAT mu {args.mu} + GPTQ {b}-bit, groupsize 128", model, size, prune_seconds, seconds)

    dense_size = rows[0][2]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'model':<{width}}  {'perplexity':>10}  {'size MB':>8}  {'of dense':>8}  {'prune s':>7}  "
          f"{'quantize s':>10}")
    for name, ppl, size, prune_s, quantize_s in rows:
        prune_text = f"{prune_s:.0f}" if prune_s is not None else "-"
        quantize_text = f"{quantize_s:.0f}" if quantize_s is not None else "-"
        print(f"{name:<{width}}  {ppl:>10.3f}  {size:>8.1f}  {size / dense_size:>8.3f}  {prune_text:>7}  "
              f"{quantize_text:>10}")
    embedding = dense.get_input_embeddings().weight
    print(f"\nOnly the linears inside the layers are quantized: every checkpoint keeps the token embeddings "
          f"(tied to the LM head) in float32, {embedding.numel() * embedding.element_size() / 2**20:.1f} MB of it.")
    print(f"peak memory {peak_memory_mb(device):.0f} MB")


if __name__ == "__main__":
    main()
