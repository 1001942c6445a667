"""What prune_opt.py, quantize_opt.py and opt_eval.py share: arguments, model and data
loading, evaluation on every available set, and the result files output/opt/<model_name>.*."""
import argparse
import os

import torch
from transformers import AutoConfig

from dataset import lm
from evaluate.perplexity import perplexity
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, load_tokenizer
from utils.cli import ArgumentParser, UserError, output_dir, positive_int, resolve_device, seed_value
from utils.results import append_result

# The paper's model names, and the hub ids they stand for when no local folder has them.
HUB_IDS = {
    "opt-125M": "facebook/opt-125m", "opt-350M": "facebook/opt-350m", "opt-1.3B": "facebook/opt-1.3b",
    "opt-2.7B": "facebook/opt-2.7b", "opt-6.7B": "facebook/opt-6.7b", "opt-13B": "facebook/opt-13b",
    "opt-30B": "facebook/opt-30b", "opt-66B": "facebook/opt-66b",
}


def decoder_parser(description):
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", required=True,
                   help="models/<model_name>, a paper name (opt-125M, opt-1.3B, ...) or a cached hub id")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the calibration windows")
    p.add_argument("--model_dir", help="checkpoint folder (default: models/<model_name>)")
    p.add_argument("--data_dir", help="folder with local corpus files (wiki.*.raw, ptb.*.txt, C4 shards, "
                                      "train.txt/test.txt)")
    p.add_argument("--task", default="wikitext2", help=f"calibration corpus: {', '.join(lm.LM_TASKS)}")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive_int, default=2048,
                   help="window length (capped at the model's context)")
    p.add_argument("--eval_samples", type=positive_int, help="evaluate on the first N windows only (default all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="weights' dtype (auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--batch_size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--output_dir", type=output_dir, default="output",
                   help="results go to <output_dir>/opt/<model_name>.txt|.jsonl")
    return p


def model_source(args):
    """A local checkpoint folder, or a hub id whose files the local cache must already hold."""
    path = args.model_dir or os.path.join("models", args.model_name)
    if os.path.isdir(path):
        return path
    if args.model_dir is None:
        hub_id = HUB_IDS.get(args.model_name, args.model_name if "/" in args.model_name else None)
        if hub_id is not None and _cached(hub_id):
            return hub_id
    raise UserError(f"checkpoint not found: {path}")


def _cached(hub_id):
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # no cache, or a cache format this huggingface_hub does not read
        return False


def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load(args, calibrate=True):
    """(device, model on the CPU, its adapter, tokenizer, eval windows per set, calibration
    batches (None unless calibrate), seqlen).

    The model stays on the CPU: layers move to the device one at a time.
    """
    device = resolve_device(args.device)
    lm.check_task(args.task)
    source = model_source(args)
    tokenizer = load_tokenizer(source)
    config = AutoConfig.from_pretrained(source)
    seqlen = min(args.seqlen, getattr(config, "max_position_embeddings", args.seqlen))
    # the data first: a missing or malformed file should fail before a large model loads
    windows = {}
    for name, tokens in lm.eval_tokens(args.task, tokenizer, args.data_dir).items():
        cap = lm.MAX_EVAL_WINDOWS.get(name)
        if args.eval_samples:
            cap = min(cap or args.eval_samples, args.eval_samples)
        windows[name] = lm.eval_windows(tokens, seqlen, cap)
    calibration = calibration_batches(args, tokenizer, seqlen) if calibrate else None
    model = load_model(source, dtype=resolve_dtype(args.dtype, device))
    try:
        adapter = adapter_for(model)
    except ValueError as err:
        raise UserError(str(err))
    if not adapter.is_decoder:
        raise UserError(f"{args.model_name} is not a decoder language model ({type(model).__name__})")
    if getattr(args, "allocation", "") is None:
        args.allocation = adapter.default_allocation
    return device, model, adapter, tokenizer, windows, calibration, seqlen


def calibration_batches(args, tokenizer, seqlen):
    windows = lm.calibration_windows(args.task, tokenizer, args.nsamples, seqlen, args.seed, args.data_dir)
    return lm.window_batches(windows, args.batch_size)


def perplexities(model, adapter, windows, device, batch_size, label):
    return {name: perplexity(model, adapter, w, device, batch_size, desc=f"{label} {name}")
            for name, w in windows.items()}


def write(args, record, lines):
    block = "\n".join([f"== {args.model_name}  {record['time']} =="] + lines)
    append_result(os.path.join(args.output_dir, "opt", args.model_name), record, block)
    print(block)


def ppl_lines(record):
    """One line per evaluation set: every ppl_* entry of the record side by side."""
    columns = [k for k in ("ppl_dense", "ppl_pruned", "ppl_quantized") if k in record]
    lines = []
    for name in record[columns[0]]:
        values = "  ".join(f"{c[4:]} {record[c][name]:.3f}" for c in columns)
        lines.append(f"perplexity {name}: {values}")
    return lines
