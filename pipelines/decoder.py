"""Decoder runs (prune_opt.py, quantize_opt.py, opt_eval.py): load, calibrate, prune and/or
quantize, score perplexity on every available set, and write output/opt/<model_name>.*.

Each entry script parses its flags and calls one of `prune`, `quantize` or `evaluate` here.
"""
import os
import time

import torch

from dataset import lm
from efficiency.latency import peak_memory_mb
from efficiency.macs import adapter_costs, count_parameters, model_macs
from evaluate.perplexity import perplexity
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_config, load_model, load_tokenizer, save_pruned
from pipelines.flags import describe_correction, stat_options, stat_record
from prune.stat import stat_prune
from quantize.sequential import quantize_model
from quantize.storage import QUANTIZED, save_quantized, weights_size_mb
from utils.cli import resolve_device, set_seed
from utils.errors import UserError
from utils.results import append_result, now, provenance

# The paper's model names, and the hub ids they stand for when no local folder has them.
HUB_IDS = {
    "opt-125M": "facebook/opt-125m", "opt-350M": "facebook/opt-350m", "opt-1.3B": "facebook/opt-1.3b",
    "opt-2.7B": "facebook/opt-2.7b", "opt-6.7B": "facebook/opt-6.7b", "opt-13B": "facebook/opt-13b",
    "opt-30B": "facebook/opt-30b", "opt-66B": "facebook/opt-66b",
}


# ---------------------------------------------------------------------------------------------
# Loading


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
    config = load_config(source)
    seqlen = min(args.seqlen, getattr(config, "max_position_embeddings", args.seqlen))
    # the data first: a missing or malformed file should fail before a large model loads
    windows = {}
    for name, tokens in lm.eval_tokens(args.task, tokenizer, args.data_dir).items():
        cap = lm.MAX_EVAL_WINDOWS.get(name)
        if args.eval_samples:
            cap = min(cap or args.eval_samples, args.eval_samples)
        windows[name] = lm.eval_windows(tokens, seqlen, cap)
    calib_batches = calibration_batches(args, tokenizer, seqlen) if calibrate else None
    model = load_model(source, dtype=resolve_dtype(args.dtype, device), formats=[QUANTIZED])
    adapter = adapter_for(model)
    if not adapter.is_decoder:
        raise UserError(f"{args.model_name} is not a decoder language model ({type(model).__name__})")
    return device, model, adapter, tokenizer, windows, calib_batches, seqlen


def calibration_batches(args, tokenizer, seqlen):
    windows = lm.calibration_windows(args.task, tokenizer, args.nsamples, seqlen, args.seed, args.data_dir)
    return lm.window_batches(windows, args.batch_size)


def perplexities(model, adapter, windows, device, batch_size, label):
    return {name: perplexity(model, adapter, w, device, batch_size, desc=f"{label} {name}")
            for name, w in windows.items()}


# ---------------------------------------------------------------------------------------------
# Pruning and quantizing, each adding to the run's record


def prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen):
    """Dense and pruned perplexities, and the record so far (μ = 1: no pruning)."""
    set_seed(args.seed)
    params_dense = count_parameters(model)
    ppl_dense = perplexities(model, adapter, windows, device, args.batch_size, "dense")
    costs = adapter_costs(adapter, seqlen)
    dense_macs = model_macs(*adapter.shape(model), costs)
    allocation = None
    start = time.perf_counter()
    if args.mu < 1.0:
        allocation = stat_prune(model, adapter, calib_batches, costs, args.mu, device, **stat_options(args)).allocation
    prune_seconds = time.perf_counter() - start
    ppl_pruned = perplexities(model, adapter, windows, device, args.batch_size, "pruned") if args.mu < 1 else ppl_dense
    attn_units, neurons = adapter.shape(model)
    return {
        "model_name": args.model_name, "task": args.task, "method": args.method, "allocation": allocation,
        **stat_record(args), "mu": args.mu,
        "mac_ratio": model_macs(attn_units, neurons, costs) / dense_macs,
        "seed": args.seed, "nsamples": args.nsamples, "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned, "heads_per_layer": attn_units, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model), "prune_seconds": prune_seconds,
    }


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


def quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record):
    """Quantize, evaluate, save; adds to `record` and returns the lines of the result block."""
    start = time.perf_counter()
    quantized = quantize_model(model, adapter, calib_batches, device, args.wbits, args.groupsize, args.sym,
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


# ---------------------------------------------------------------------------------------------
# Result blocks


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


def pruning_lines(record):
    """The lines of a result block that say what pruning did."""
    return [
        f"MACs kept: {record['mac_ratio']:.4f} of dense (target {record['mu']})",
        *ppl_lines(record),
        f"heads per layer: {record['heads_per_layer']}",
        f"neurons per layer: {record['neurons_per_layer']}",
        f"parameters: dense {record['params_dense'] / 1e6:.2f}M  pruned {record['params_pruned'] / 1e6:.2f}M",
        f"prune time: {record['prune_seconds']:.1f} s, peak memory {record['peak_memory_mb']:.0f} MB",
    ]


def finish(args, record, device):
    """The keys every decoder record ends with."""
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now(),
                  **provenance(args.command))


# ---------------------------------------------------------------------------------------------
# The three runs


def prune(args):
    """prune_opt.py: prune with STAT, report dense and pruned perplexity."""
    device, model, adapter, tokenizer, windows, calib_batches, seqlen = load(args)
    record = prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen)
    if args.save_model:
        save_pruned(model, args.save_model, tokenizer)
        record["saved_to"] = args.save_model
    finish(args, record, device)
    write(args, record, [
        f"prune_opt: method {args.method} (allocation {record['allocation']}, calibration {args.calibration}, "
        f"{describe_correction(args)}), "
        f"mu {args.mu}, calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed}), "
        f"device {device}",
        *pruning_lines(record),
    ])
    return record


def quantize(args):
    """quantize_opt.py: prune with STAT (unless μ = 1), then quantize; report all three."""
    device, model, adapter, tokenizer, windows, calib_batches, seqlen = load(args)
    record = prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen)
    quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record)
    pruning = (f"STAT mu {args.mu} (method {args.method}, allocation {record['allocation']}, "
               f"calibration {args.calibration}, {describe_correction(args)})" if args.mu < 1 else "no pruning (mu 1)")
    finish(args, record, device)
    write(args, record, [
        f"quantize_opt: {pruning}, then {describe_quantizer(args)}; calibrated on {args.task} "
        f"({args.nsamples} x {seqlen} tokens, seed {args.seed}), device {device}",
        *pruning_lines(record),
        *quantize_lines,
    ])
    return record


def evaluate(args):
    """opt_eval.py: dense perplexity; with --wbits, the dense-then-quantized baseline."""
    set_seed(args.seed)
    # RTN needs no calibration data.
    device, model, adapter, tokenizer, windows, calib_batches, seqlen = load(
        args, calibrate=args.wbits is not None and not args.nearest)
    record = {
        "model_name": args.model_name, "task": args.task, "method": "dense", "mu": 1.0, "seed": args.seed,
        "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": perplexities(model, adapter, windows, device, args.batch_size, "dense"),
        "params_dense": count_parameters(model),
    }
    lines = [f"opt_eval: dense, windows of {seqlen} tokens, device {device}"]
    quantize_lines = []
    if args.wbits is not None:
        record["nsamples"] = 0 if args.nearest else args.nsamples
        quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches or [],
                                             record)
        data = ("no calibration data" if args.nearest else
                f"calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed})")
        lines = [f"opt_eval: dense, then {describe_quantizer(args)}; {data}, device {device}"]
    finish(args, record, device)
    write(args, record, [*lines, *ppl_lines(record), *quantize_lines])
    return record
