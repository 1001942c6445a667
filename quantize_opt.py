"""Prune a decoder language model (OPT, Llama-family) with STAT, then quantize it with GPTQ.

    python quantize_opt.py --model_name opt-125M --task wikitext2 --mu 0.9 --seed 0 --wbits 4 [--groupsize 128]

Prunes to a fraction μ of the attention and FFN multiply-accumulates as prune_opt.py does
(μ = 1: no pruning), then quantizes the weights of every linear layer inside the transformer
layers to --wbits bits, layer by layer, each layer calibrated on the outputs of the quantized
layers below it (the same calibration windows as the pruning). Reports perplexity on every
available evaluation set: dense, pruned and quantized. --save_model writes the packed integer
codes with their per-group scales and zero points (load the folder with
prerequisites.checkpoint.load_model) and reports its size on disk against the dense
checkpoint's. Results: output/opt/<model_name>.txt and .jsonl.
"""
import argparse
import os
import time

from efficiency.latency import peak_memory_mb
from prune_opt import add_prune_arguments, prune_and_report, pruning_lines
from quantize.sequential import quantize_model
from quantize.storage import save_quantized, weights_size_mb
from utils.cli import output_dir, run_main
from utils.decoder_cli import decoder_parser, load, model_source, perplexities, write
from utils.results import now

WBITS = (2, 3, 4, 8)
QUANTIZE_FLAGS = ("groupsize", "sym", "act_order", "nearest", "percdamp", "save_model")


def groupsize_value(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"groupsize must be -1 or a positive integer, got {text!r}")
    if value != -1 and value <= 0:
        raise argparse.ArgumentTypeError(f"groupsize must be -1 (one group per row) or positive, got {value}")
    return value


def percdamp_value(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"percdamp must be a positive number, got {text!r}")
    if not value > 0:  # zero dampening fails on any singular Hessian (dead or collinear inputs)
        raise argparse.ArgumentTypeError(f"percdamp must be positive, got {value}")
    return value


def add_quantize_arguments(p, wbits_required):
    """The quantization flags, shared with opt_eval.py."""
    p.add_argument("--wbits", type=int, choices=WBITS, required=wbits_required, help="bits per weight")
    p.add_argument("--groupsize", type=groupsize_value, default=-1,
                   help="columns that share a scale and zero point (-1: one group per row)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero point in the middle)")
    p.add_argument("--act_order", action="store_true",
                   help="quantize the columns in order of decreasing Hessian diagonal (GPTQ only)")
    p.add_argument("--nearest", action="store_true", help="round to nearest (RTN baseline) instead of GPTQ")
    p.add_argument("--percdamp", type=percdamp_value, default=0.01,
                   help="Hessian dampening, as a fraction of its mean diagonal")
    p.add_argument("--save_model", type=output_dir, metavar="DIR",
                   help="write the quantized model (packed low-bit weights) here")


def check_quantize_arguments(p, args):
    """One-line errors (exit 2) for flag combinations that would be silently ignored."""
    if args.wbits is None:
        given = [f"--{flag}" for flag in QUANTIZE_FLAGS if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"{', '.join(given)} need --wbits")
    if args.nearest and args.act_order:
        p.error("--act_order applies to GPTQ, not to --nearest (round to nearest)")


def parse_args(argv=None):
    p = decoder_parser(__doc__)
    add_prune_arguments(p)  # μ = 1: no pruning
    add_quantize_arguments(p, wbits_required=True)
    args = p.parse_args(argv)
    check_quantize_arguments(p, args)
    return args


def quantize_settings(args):
    return {"wbits": args.wbits, "groupsize": args.groupsize, "sym": args.sym, "act_order": args.act_order,
            "nearest": args.nearest, "percdamp": args.percdamp}


def describe_quantizer(args):
    """E.g. 'GPTQ 4-bit (groupsize 128, asymmetric, act_order, percdamp 0.01)'."""
    details = ["per row" if args.groupsize == -1 else f"groupsize {args.groupsize}",
               "symmetric" if args.sym else "asymmetric"]
    if not args.nearest:
        details += (["act_order"] if args.act_order else []) + [f"percdamp {args.percdamp}"]
    return f"{'RTN' if args.nearest else 'GPTQ'} {args.wbits}-bit ({', '.join(details)})"


def dense_checkpoint_dir(args):
    """The folder of the dense checkpoint's files (a hub id's snapshot in the local cache)."""
    source = model_source(args)
    if os.path.isdir(source):
        return source
    from huggingface_hub import try_to_load_from_cache

    return os.path.dirname(try_to_load_from_cache(source, "config.json"))


def quantize_and_report(args, device, model, adapter, tokenizer, windows, calibration, record):
    """Shared with opt_eval.py: quantize, evaluate, save; adds to `record` and returns text lines."""
    start = time.perf_counter()
    quantized = quantize_model(model, adapter, calibration, device, args.wbits, args.groupsize, args.sym,
                               args.act_order, args.percdamp, args.nearest)
    record.update(quantize_settings(args), quantize_seconds=time.perf_counter() - start)
    record["ppl_quantized"] = perplexities(model, adapter, windows, device, args.batch_size, "quantized")
    lines = [f"quantize time: {record['quantize_seconds']:.1f} s ({len(quantized)} linear layers)"]
    if args.save_model:
        save_quantized(model, quantized, args.save_model, tokenizer, quantize_settings(args))
        dense_mb, quantized_mb = weights_size_mb(dense_checkpoint_dir(args)), weights_size_mb(args.save_model)
        record.update(size_on_disk_mb={"dense": dense_mb, "quantized": quantized_mb}, saved_to=args.save_model)
        lines.append(f"size on disk: dense {dense_mb:.2f} MB, quantized {quantized_mb:.2f} MB "
                     f"({quantized_mb / dense_mb:.3f} of dense), saved to {args.save_model}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    device, model, adapter, tokenizer, windows, calibration, seqlen = load(args)
    record = prune_and_report(args, device, model, adapter, windows, calibration, seqlen)
    quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calibration, record)
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now())
    pruning = (f"STAT mu {args.mu} (method {args.method}, allocation {args.allocation}, "
               f"calibration {args.calibration})" if args.mu < 1 else "no pruning (mu 1)")
    write(args, record, [
        f"quantize_opt: {pruning}, then {describe_quantizer(args)}; calibrated on {args.task} "
        f"({args.nsamples} x {seqlen} tokens, seed {args.seed}), device {device}",
        *pruning_lines(record),
        *quantize_lines,
    ])
    return record


if __name__ == "__main__":
    run_main(main)
