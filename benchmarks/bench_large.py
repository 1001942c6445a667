"""Benchmark --low_memory: pruning a model larger than what the process may hold.

    python benchmarks/bench_large.py [--layers 24 --hidden 2048 --ffn 5504 --vocab 32000]
                                     [--windows 8 --seqlen 256 --mu 0.5] [--in_memory] [--work_dir DIR]

Builds a random Llama-shaped checkpoint (float32, one safetensors shard per layer, written layer
by layer from a seeded generator: the model is never in memory), then prunes it with STAT in a
fresh process with the layers streamed from disk (prerequisites/streaming.py: load_streamed,
stat_prune with the LayerStore, the pruned checkpoint written shard by shard), and prints that
process's peak resident memory against the model's size and against one layer + the
calibration activations + the embeddings. --in_memory also runs the default path (the whole
model loaded) the same way, for comparison. Everything it writes is deleted at the end.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from efficiency.latency import RssPeak  # noqa: E402
from efficiency.macs import adapter_costs  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, save_pruned  # noqa: E402
from prerequisites.layerwise import release_memory  # noqa: E402
from prerequisites.streaming import INDEX_FILE, load_streamed  # noqa: E402
from prune.stat import stat_prune  # noqa: E402

GB = 2**30


def config_of(args):
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, intermediate_size=args.ffn,
                       max_position_embeddings=max(2048, args.seqlen), tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


def layer_shapes(args):
    d, f = args.hidden, args.ffn
    return {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d), "self_attn.v_proj.weight": (d, d),
            "self_attn.o_proj.weight": (d, d), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}


def build_checkpoint(args, path):
    """Write the random model shard by shard (one layer's tensors in memory at a time)."""
    os.makedirs(path)
    config_of(args).save_pretrained(path)
    count = args.layers + 1
    shard = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map = {}
    for index in range(count):
        g = torch.Generator().manual_seed(index)
        if index < args.layers:
            tensors = {}
            for name, shape in layer_shapes(args).items():
                if len(shape) == 1:
                    tensors[name] = torch.ones(shape)
                else:  # scaled so that layers do real work (as tests/tiny.py spreads them)
                    tensors[name] = torch.randn(shape, generator=g) * (0.3 / shape[1] ** 0.5)
            tensors = {f"model.layers.{index}.{name}": t for name, t in tensors.items()}
        else:
            tensors = {"model.embed_tokens.weight": torch.randn(args.vocab, args.hidden, generator=g) * 0.02,
                       "model.norm.weight": torch.ones(args.hidden),
                       "lm_head.weight": torch.randn(args.vocab, args.hidden, generator=g) * 0.02}
        save_file(tensors, os.path.join(path, shard(index + 1, count)), metadata={"format": "pt"})
        weight_map.update({name: shard(index + 1, count) for name in tensors})
        del tensors
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def sizes(args):
    """Bytes of the model, one layer, the embeddings + LM head, one set of calibration hidden states."""
    layer = sum(torch.Size(s).numel() for s in layer_shapes(args).values()) * 4
    embeddings = 2 * args.vocab * args.hidden * 4 + args.hidden * 4
    # STAT's own matrices for one layer: the FFN's Gram and its pivoted Cholesky factor (float64,
    # n x n each) and the FFN output projection in float64 (prune/units.py)
    stat = 2 * args.ffn ** 2 * 8 + args.hidden * args.ffn * 8
    return {"model": args.layers * layer + embeddings, "layer": layer, "embeddings": embeddings,
            "activations": args.windows * args.seqlen * args.hidden * 4, "stat": stat}


def child(args):
    """In a fresh process: load, prune, save one way; print the figures as JSON."""
    batches = [{"input_ids": torch.randint(0, args.vocab, (1, args.seqlen), generator=torch.Generator().manual_seed(i))}
               for i in range(args.windows)]
    torch.ones(64, 64) @ torch.ones(64, 64)  # the runtime's one-off buffers, before the start mark
    release_memory()
    start_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = {}
    with RssPeak(interval=0.002) as memory:
        t = time.perf_counter()
        if args.child == "streamed":
            model, store = load_streamed(args.checkpoint, os.path.join(args.out, "layers"))
        else:
            model, store = load_model(args.checkpoint), None
        adapter = adapter_for(model)
        times["load"] = time.perf_counter() - t
        t = time.perf_counter()
        result = stat_prune(model, adapter, batches, adapter_costs(adapter, args.seqlen), args.mu, "cpu",
                            progress=False, store=store)
        times["prune"] = time.perf_counter() - t
        t = time.perf_counter()
        if store is not None:
            store.save(os.path.join(args.out, "pruned"))
        else:
            save_pruned(model, os.path.join(args.out, "pruned"))
        times["save"] = time.perf_counter() - t
    with open(os.path.join(args.out, "pruned", "config.json")) as f:
        saved_ffn = json.load(f)["stat_ffn"]
    print(json.dumps({"peak_above_start_mb": memory.peak_mb, "start_mb": start_mb,
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "neurons": result.neurons, "saved_matches": saved_ffn == result.neurons, **times}))


def run_child(args, how, work):
    out = os.path.join(work, how)
    os.makedirs(out)
    command = [sys.executable, __file__, "--child", how, "--checkpoint", os.path.join(work, "dense"), "--out", out,
               *[f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "ffn", "vocab", "heads", "windows",
                                                       "seqlen", "mu")]]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    pruned_gb = sum(os.path.getsize(os.path.join(out, "pruned", f)) for f in os.listdir(os.path.join(out, "pruned"))
                    if f.endswith(".safetensors")) / GB
    shutil.rmtree(out)
    return {**json.loads(lines[-1]), "pruned_gb": pruned_gb}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5504)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--windows", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--in_memory", action="store_true", help="also prune with the whole model loaded (default path)")
    p.add_argument("--work_dir", help="where to write the checkpoints (default: the system's temporary folder)")
    p.add_argument("--child", choices=["streamed", "in_memory"], help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    s = sizes(args)
    work = tempfile.mkdtemp(prefix="bench-large-", dir=args.work_dir)
    try:
        t = time.perf_counter()
        with RssPeak() as building:
            build_checkpoint(args, os.path.join(work, "dense"))
        on_disk = sum(os.path.getsize(os.path.join(work, "dense", f)) for f in os.listdir(os.path.join(work, "dense")))
        print(f"model: Llama-shaped, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, vocab {args.vocab}, "
              f"{args.heads} heads, float32: {on_disk / GB:.2f} GB on disk, built in {time.perf_counter() - t:.0f} s "
              f"(peak RSS while building {building.peak_mb / 1024:.2f} GB above start)")
        print(f"one layer {s['layer'] / GB:.3f} GB; embeddings + LM head {s['embeddings'] / GB:.3f} GB; calibration "
              f"{args.windows} x {args.seqlen} tokens: {s['activations'] / GB:.3f} GB per set of hidden states; "
              f"STAT's matrices for one layer {s['stat'] / GB:.3f} GB; mu {args.mu}")
        bound = s["layer"] + s["activations"] + s["embeddings"]
        with_stat = bound + s["stat"]
        runs = [("streamed", "--low_memory")] + ([("in_memory", "in memory (default)")] if args.in_memory else [])
        print(f"\n{'run':<22}{'peak RSS GB':>12}{'above start':>12}{'/ model':>9}{'/ bound':>9}{'/ +STAT':>9}"
              f"{'load s':>8}{'prune s':>9}{'save s':>8}{'pruned GB':>11}")
        for how, label in runs:
            r = run_child(args, how, work)
            above = r["peak_above_start_mb"] * 2**20
            print(f"{label:<22}{r['max_rss_mb'] / 1024:>12.2f}{above / GB:>12.2f}{above / s['model']:>9.2f}"
                  f"{above / bound:>9.2f}{above / with_stat:>9.2f}{r['load']:>8.1f}{r['prune']:>9.1f}"
                  f"{r['save']:>8.1f}{r['pruned_gb']:>11.2f}")
            assert r["saved_matches"], "the saved checkpoint does not record the pruned shapes"
        print(f"\nbound = one layer + one set of activations + embeddings = {bound / GB:.2f} GB; +STAT: plus STAT's "
              f"matrices for one layer = {with_stat / GB:.2f} GB; 'above start': peak RSS of the child process above "
              f"its RSS after imports (sampled every 2 ms)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
