"""Decoder runs (prune_opt.py, quantize_opt.py, opt_eval.py): load, calibrate, prune and/or
quantize, score perplexity on every available set, and write output/opt/<model_name>.*.

Each entry script parses its flags and calls one of `prune`, `quantize` or `evaluate` here.
"""
import contextlib
import os
import tempfile
import time

import torch

from dataset import lm
from efficiency.latency import peak_memory_mb
from efficiency.macs import adapter_costs, count_parameters, model_macs
from evaluate import zero_shot
from evaluate.perplexity import perplexity
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_config, load_model, load_tokenizer, save_pruned
from prerequisites.streaming import load_streamed
from prune.stat import stat_prune
from quantize.sequential import quantize_model
from quantize.storage import QUANTIZED, is_quantized, save_quantized, weights_size_mb
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


def load(args, stack, calibrate=True):
    """(device, model on the CPU, its adapter, tokenizer, eval windows per set, calibration
    batches (None unless calibrate), seqlen, LayerStore or None).

    The model stays on the CPU: layers move to the device one at a time. With --low_memory its
    layers stay on disk between their turns (the store's folder is removed when `stack` closes).
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
    if args.lm_eval_tasks:
        zero_shot.check_tasks(args.lm_eval_tasks, args.lm_eval_include_path)
    model, store = load_weights(args, config, device, stack)
    adapter = adapter_for(model)
    if not adapter.is_decoder:
        raise UserError(f"{args.model_name} is not a decoder language model ({type(model).__name__})")
    return device, model, adapter, tokenizer, windows, calib_batches, seqlen, store


def load_weights(args, config, device, stack):
    """(model, None), or with --low_memory (model with empty layers, the LayerStore that fills
    them): prerequisites/streaming.py."""
    dtype = resolve_dtype(args.dtype, device)
    if not args.low_memory:
        return load_model(model_source(args), dtype=dtype, formats=[QUANTIZED]), None
    if is_quantized(config):
        raise UserError("--low_memory reads ordinary (dense or pruned) checkpoints, not packed quantized ones")
    # the layers that change are written beside --save_model when its folder exists (moving them
    # there at the end is then a rename), else in the system's temporary folder
    parent = os.path.dirname(os.path.abspath(args.save_model)) if getattr(args, "save_model", None) else None
    folder = stack.enter_context(tempfile.TemporaryDirectory(
        prefix=".stat-layers-", dir=parent if parent and os.path.isdir(parent) else None))
    return load_streamed(dense_checkpoint_dir(args), folder, dtype)


def calibration_batches(args, tokenizer, seqlen):
    windows = lm.calibration_windows(args.task, tokenizer, args.nsamples, seqlen, args.seed, args.data_dir)
    return lm.window_batches(windows, args.batch_size)


def perplexities(model, adapter, windows, device, batch_size, label, store=None):
    return {name: perplexity(model, adapter, w, device, batch_size, desc=f"{label} {name}", store=store)
            for name, w in windows.items()}


# ---------------------------------------------------------------------------------------------
# Pruning and quantizing, each adding to the run's record


def prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen, store=None):
    """Dense and pruned perplexities, and the record so far (μ = 1: no pruning)."""
    set_seed(args.seed)
    params_dense = count_parameters(model)
    ppl_dense = perplexities(model, adapter, windows, device, args.batch_size, "dense", store)
    costs = adapter_costs(adapter, seqlen)
    dense_macs = model_macs(*adapter.shape(model), costs)
    allocation = None
    start = time.perf_counter()
    if args.mu < 1.0:
        allocation = stat_prune(model, adapter, calib_batches, costs, args.mu, device,
                                method=args.method, allocation=args.allocation, calibration=args.calibration,
                                sketch_rows=args.sketch, score_fraction=args.score_fraction, store=store).allocation
    prune_seconds = time.perf_counter() - start
    ppl_pruned = (perplexities(model, adapter, windows, device, args.batch_size, "pruned", store) if args.mu < 1
                  else ppl_dense)
    attn_units, neurons = adapter.shape(model)
    return {
        "model_name": args.model_name, "task": args.task, "method": args.method, "allocation": allocation,
        "calibration": args.calibration, "score_fraction": args.score_fraction, "mu": args.mu,
        "mac_ratio": model_macs(attn_units, neurons, costs) / dense_macs,
        "seed": args.seed, "nsamples": args.nsamples, "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned, "heads_per_layer": attn_units, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model), "prune_seconds": prune_seconds,
        "low_memory": args.low_memory,
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


def quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record, store=None):
    """Quantize, evaluate, save; adds to `record` and returns the lines of the result block."""
    start = time.perf_counter()
    quantized = quantize_model(model, adapter, calib_batches, device, args.wbits, args.groupsize, args.sym,
                               args.act_order, args.percdamp, args.nearest, store=store)
    record.update(quantize_settings(args), quantize_seconds=time.perf_counter() - start)
    record["ppl_quantized"] = perplexities(model, adapter, windows, device, args.batch_size, "quantized", store)
    lines = [f"quantize time: {record['quantize_seconds']:.1f} s ({len(quantized)} linear layers)"]
    if args.save_model:
        save_quantized(model, quantized, args.save_model, tokenizer, quantize_settings(args), store)
        dense_mb, quantized_mb = weights_size_mb(dense_checkpoint_dir(args)), weights_size_mb(args.save_model)
        record.update(size_on_disk_mb={"dense": dense_mb, "quantized": quantized_mb}, saved_to=args.save_model)
        lines.append(f"size on disk: dense {dense_mb:.2f} MB, quantized {quantized_mb:.2f} MB "
                     f"({quantized_mb / dense_mb:.3f} of dense), saved to {args.save_model}")
    return lines


def save_model(model, path, tokenizer, store=None):
    """Write a pruned (or dense) model as a pruned checkpoint: in one go, or with a LayerStore
    layer by layer (the same checkpoint, sharded)."""
    if store is None:
        save_pruned(model, path, tokenizer)
    else:
        store.save(path, tokenizer)


# ---------------------------------------------------------------------------------------------
# Zero-shot scores (lm-evaluation-harness, in a process of its own: evaluate/zero_shot.py)


def temporary_checkpoint(model, tokenizer, stack, store=None):
    """The model saved as an ordinary (pruned) checkpoint in a folder deleted when `stack` closes.
    (A quantized model is saved with its dequantized weights: lm-eval loads it with transformers.)"""
    path = stack.enter_context(tempfile.TemporaryDirectory(prefix="stat-lm-eval-"))
    save_model(model, path, tokenizer, store)
    return path


def lm_eval_dense_dir(args, model, tokenizer, stack):
    """The dense model's folder for lm-eval: its checkpoint, or (a packed quantized checkpoint,
    which transformers cannot read) the model as loaded, saved to a temporary folder. Called
    before the model is compressed (--low_memory never loads a packed checkpoint)."""
    if not args.lm_eval_tasks:
        return None
    path = dense_checkpoint_dir(args)
    return temporary_checkpoint(model, tokenizer, stack) if is_quantized(load_config(path)) else path


def zero_shot_scores(args, device, checkpoints):
    """The record entries of lm-eval's scores of each (label, checkpoint folder)."""
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    scores, version = zero_shot.score(checkpoints, args.lm_eval_tasks, args.lm_eval_include_path, args.lm_eval_limit,
                                      args.lm_eval_batch_size, device, dtype)
    settings = {"tasks": args.lm_eval_tasks, "num_fewshot": zero_shot.NUM_FEWSHOT, "limit": args.lm_eval_limit,
                "batch_size": args.lm_eval_batch_size, "include_path": args.lm_eval_include_path, "version": version}
    return {"lm_eval": scores, "lm_eval_settings": settings}


def zero_shot_lines(record):
    if "lm_eval" not in record:
        return []
    settings = record["lm_eval_settings"]
    limit = f", first {settings['limit']} examples of each task" if settings["limit"] else ""
    return [f"zero-shot (lm-eval {settings['version']}, {settings['num_fewshot']}-shot{limit}):",
            *zero_shot.lines(record["lm_eval"])]


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
    """prune_opt.py: prune with STAT, report dense and pruned perplexity (and zero-shot scores)."""
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(args, stack)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        record = prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen, store)
        if args.save_model:
            save_model(model, args.save_model, tokenizer, store)
            record["saved_to"] = args.save_model
        if args.lm_eval_tasks:
            checkpoints = [("dense", dense_dir)]
            if args.mu < 1:
                checkpoints.append(("pruned", args.save_model or temporary_checkpoint(model, tokenizer, stack, store)))
            del model, store  # lm-eval loads its own copy, in another process
            record.update(zero_shot_scores(args, device, checkpoints))
            record["lm_eval"].setdefault("pruned", record["lm_eval"]["dense"])  # mu 1: nothing was pruned
    finish(args, record, device)
    write(args, record, [
        f"prune_opt: method {args.method} (allocation {record['allocation']}, calibration {args.calibration}), "
        f"mu {args.mu}, calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed}), "
        f"device {device}{', low memory' if args.low_memory else ''}",
        *pruning_lines(record),
        *zero_shot_lines(record),
    ])
    return record


def quantize(args):
    """quantize_opt.py: prune with STAT (unless μ = 1), then quantize; report all three."""
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(args, stack)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        record = prune_and_report(args, device, model, adapter, windows, calib_batches, seqlen, store)
        quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record,
                                             store)
        if args.lm_eval_tasks:
            checkpoints = [("dense", dense_dir), ("quantized", temporary_checkpoint(model, tokenizer, stack, store))]
            del model, store  # lm-eval loads its own copies, in another process
            record.update(zero_shot_scores(args, device, checkpoints))
    pruning = (f"STAT mu {args.mu} (method {args.method}, allocation {record['allocation']}, "
               f"calibration {args.calibration})" if args.mu < 1 else "no pruning (mu 1)")
    finish(args, record, device)
    write(args, record, [
        f"quantize_opt: {pruning}, then {describe_quantizer(args)}; calibrated on {args.task} "
        f"({args.nsamples} x {seqlen} tokens, seed {args.seed}), device {device}"
        f"{', low memory' if args.low_memory else ''}",
        *pruning_lines(record),
        *quantize_lines,
        *zero_shot_lines(record),
    ])
    return record


def evaluate(args):
    """opt_eval.py: dense perplexity; with --wbits, the dense-then-quantized baseline."""
    set_seed(args.seed)
    # RTN needs no calibration data.
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(
            args, stack, calibrate=args.wbits is not None and not args.nearest)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        record = {
            "model_name": args.model_name, "task": args.task, "method": "dense", "mu": 1.0, "seed": args.seed,
            "seqlen": seqlen, "eval_samples": args.eval_samples,
            "ppl_dense": perplexities(model, adapter, windows, device, args.batch_size, "dense", store),
            "params_dense": count_parameters(model), "low_memory": args.low_memory,
        }
        memory = ", low memory" if args.low_memory else ""
        lines = [f"opt_eval: dense, windows of {seqlen} tokens, device {device}{memory}"]
        quantize_lines = []
        checkpoints = [("dense", dense_dir)]
        if args.wbits is not None:
            record["nsamples"] = 0 if args.nearest else args.nsamples
            quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows,
                                                 calib_batches or [], record, store)
            data = ("no calibration data" if args.nearest else
                    f"calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed})")
            lines = [f"opt_eval: dense, then {describe_quantizer(args)}; {data}, device {device}{memory}"]
            if args.lm_eval_tasks:
                checkpoints.append(("quantized", temporary_checkpoint(model, tokenizer, stack, store)))
        if args.lm_eval_tasks:
            del model, store  # lm-eval loads its own copies, in another process
            record.update(zero_shot_scores(args, device, checkpoints))
    finish(args, record, device)
    write(args, record, [*lines, *ppl_lines(record), *quantize_lines, *zero_shot_lines(record)])
    return record
