"""The demo's SmolLM2-135M, dense and pruned, in llama.cpp: perplexity, speed and size against
this repository's own (transformers) figures, on the same windows, threads and machine.

    make gguf && .venv/bin/python benchmarks/bench_gguf.py [--models 0.8 0.8:32 ...] [--windows 8]

Each model is μ or μ:K. It is pruned as the demo prunes (prune_opt.py --task austen --nsamples 32
--seqlen 512 --seed 0, with --width_multiple K; skipped when <work>/smollm2-mu<μ>[-w<K>] already
holds a checkpoint). The dense and pruned checkpoints are exported with scripts/export_gguf.py
as f32, f16 and q8_0, and the f32 file is quantized with llama.cpp's own quantizer to Q4_K_M.
Then, for every file:
- perplexity on the first --windows windows of 512 tokens of the demo's test text
  (prideprejudice), token ids fed to both engines, against transformers on the checkpoint;
- prompt processing: one --prompt-token window from an empty cache; generation: --gen tokens
  one at a time after a 64-token prompt (fixed tokens: the work of greedy decoding without the
  sampler); the median of --repeats rounds, tokens per second, for llama.cpp and for
  transformers (its own KV cache), both on --threads threads. Each round measures every file
  once, in turn, so that the machine's drift falls on all of them alike;
- file size.
Prints a Markdown table and writes <work>/results.json (whole or not at all).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gguf  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from dataset.lm import AUSTEN_DIR, AUSTEN_EVAL, eval_tokens, eval_windows  # noqa: E402
from evaluate import llama_cpp  # noqa: E402
from evaluate.perplexity import perplexity  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from scripts.convert_smollm2 import DEFAULT_OUT, convert  # noqa: E402
from utils.atomic import atomic_file  # noqa: E402

SEQLEN = 512
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def prune(variant, work):
    """The checkpoint of a variant "μ" or "μ:K" (K: --width_multiple), pruned once."""
    mu, _, multiple = variant.partition(":")
    folder = os.path.join(work, f"smollm2-mu{mu}" + (f"-w{multiple}" if multiple else ""))
    if not os.path.exists(os.path.join(folder, "config.json")):
        run(["prune_opt.py", "--model_name", "smollm2-135m", "--task", "austen", "--mu", mu, "--seed", "0",
             "--nsamples", "32", "--seqlen", str(SEQLEN), "--eval_samples", "1", "--save_model", folder,
             "--width_multiple", multiple or "1", "--output_dir", os.path.join(work, "runs")])
    return folder


def ggufs(checkpoint, stem):
    """{type: path} of the exported and quantized files of one checkpoint."""
    paths = {kind: f"{stem}-{kind}.gguf" for kind in GGUF_TYPES}
    for kind in ("f32", "f16", "q8_0"):
        if not os.path.exists(paths[kind]):
            run(["scripts/export_gguf.py", checkpoint, paths[kind], "--outtype", kind])
    if not os.path.exists(paths["q4_k_m"]):
        llama_cpp.quantize(paths["f32"], paths["q4_k_m"], "q4_k_m")
    return paths


def tensor_types(path):
    """{GGML type: how many tensors} of a GGUF file: where a quantizer fell back to another type."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors))


def same_tokens(path, tokenizer):
    """Whether llama.cpp's tokenizer (from the GGUF file) and the checkpoint's agree on the whole test novel."""
    with open(os.path.join(AUSTEN_DIR, f"{AUSTEN_EVAL}.txt"), encoding="utf-8") as f:
        text = f.read()
    with llama_cpp.load(path, n_ctx=64) as llm:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == tokenizer(text)["input_ids"]


def llama_cpp_round(path, args, ids):
    """(prompt seconds, generation seconds) of one run of a GGUF file."""
    with llama_cpp.load(path, n_ctx=SEQLEN, threads=args.threads, logits_all=False) as llm:
        llm.eval(ids[:args.prompt_tokens])  # warm-up
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:args.prompt_tokens])
        prompt = time.perf_counter() - start
        llm.reset()
        llm.eval(ids[:64])
        start = time.perf_counter()
        for token in ids[64:64 + args.gen]:
            llm.eval([token])
        return prompt, time.perf_counter() - start


@torch.no_grad()
def transformers_round(model, args, ids):
    ids = torch.tensor([ids])
    model(ids[:, :args.prompt_tokens], use_cache=False)  # warm-up
    start = time.perf_counter()
    model(ids[:, :args.prompt_tokens], use_cache=False)
    prompt = time.perf_counter() - start
    cache = DynamicCache()
    model(ids[:, :64], past_key_values=cache, use_cache=True)
    start = time.perf_counter()
    for i in range(64, 64 + args.gen):
        model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    return prompt, time.perf_counter() - start


def quality(name, checkpoint, work, windows, threads):
    """Rows of one checkpoint: transformers on it, llama.cpp on each of its GGUF files."""
    model = load_model(checkpoint)
    rows = [{"model": name, "engine": "transformers", "type": "f32", "checkpoint": checkpoint,
             "ppl": perplexity(model, adapter_for(model), windows, "cpu", progress=False),
             "mib": sum(p.numel() * 4 for p in model.parameters()) / 2**20}]
    for kind, path in ggufs(checkpoint, os.path.join(work, name)).items():
        with llama_cpp.load(path, n_ctx=SEQLEN, threads=threads) as llm:
            ppl = llama_cpp.perplexity(llm, windows.tolist())
        rows.append({"model": name, "engine": "llama.cpp", "type": kind, "path": path, "ppl": ppl,
                     "mib": os.path.getsize(path) / 2**20, "tensor_types": tensor_types(path)})
        print(rows[-1], flush=True)
    return rows


def speed(rows, args, ids):
    """Fill each row's prompt and generation tokens per second: medians over rounds that each
    run every file (and transformers on every checkpoint) once."""
    seconds = {i: [] for i in range(len(rows))}
    models = {}
    for round_ in tqdm(range(args.repeats), desc="speed rounds"):
        for i, row in enumerate(rows):
            if row["engine"] == "llama.cpp":
                seconds[i].append(llama_cpp_round(row["path"], args, ids))
            else:
                if row["checkpoint"] not in models:
                    models[row["checkpoint"]] = load_model(row["checkpoint"])
                seconds[i].append(transformers_round(models[row["checkpoint"]], args, ids))
    for i, row in enumerate(rows):
        row["pp"] = args.prompt_tokens / statistics.median(p for p, _ in seconds[i])
        row["tg"] = args.gen / statistics.median(g for _, g in seconds[i])


def table(rows):
    dense = {(r["engine"], r["type"]): r for r in rows if r["model"] == "dense"}
    lines = ["| model | engine | weights | perplexity | vs transformers | prompt tok/s | vs dense | "
             "generation tok/s | vs dense | MiB |", "|" + " --- |" * 10]
    for r in rows:
        own = next(o for o in rows if o["model"] == r["model"] and o["engine"] == "transformers")
        base = dense[(r["engine"], r["type"])]
        lines.append(f"| {r['model']} | {r['engine']} | {r['type']} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / own['ppl'] - 1:+.3%} | {r['pp']:.0f} | {r['pp'] / base['pp']:.2f}x | "
                     f"{r['tg']:.1f} | {r['tg'] / base['tg']:.2f}x | {r['mib']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["0.9", "0.8", "0.7", "0.9:32", "0.8:32", "0.7:32", "0.8:256"],
                   help="μ or μ:K (K: --width_multiple) of each pruned model; none: the dense model only")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default=os.path.join(ROOT, "output", "bench_gguf"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    dense = convert(DEFAULT_OUT)
    checkpoints = {"dense": dense}
    for variant in args.models:
        checkpoints[f"mu{variant.replace(':', '-w')}"] = prune(variant, args.work)
    tokenizer = load_tokenizer(dense)
    tokens = eval_tokens("austen", tokenizer)
    windows = eval_windows(next(iter(tokens.values())), SEQLEN, args.windows)
    rows = []
    for name, checkpoint in checkpoints.items():
        rows += quality(name, checkpoint, args.work, windows, args.threads)
    speed(rows, args, windows[0].tolist())
    same = same_tokens(os.path.join(args.work, "dense-f32.gguf"), tokenizer)
    print(f"llama.cpp tokenizes the whole of {AUSTEN_EVAL} as transformers does: {same}")
    record = {"same_tokens": same, "threads": args.threads, "windows": args.windows, "seqlen": SEQLEN,
              "prompt_tokens": args.prompt_tokens, "gen": args.gen, "repeats": args.repeats, "rows": rows}
    with atomic_file(os.path.join(args.work, "results.json")) as f:
        json.dump(record, f, indent=1)
    print(table(rows))
    for r in rows:
        if r["type"] == "q4_k_m":
            print(f"{r['model']} q4_k_m tensor types: {r['tensor_types']}")


if __name__ == "__main__":
    main()
