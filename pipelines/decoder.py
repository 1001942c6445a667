"""Decoder runs (prune_opt.py, quantize_opt.py, opt_eval.py): load, calibrate, prune and/or
quantize, score perplexity on the evaluation sets, and write output/opt/<model_name>.*.

Each entry script parses its flags and calls one of `prune`, `quantize` or `evaluate` here.
"""
import contextlib
import math
import os
import sys
import tempfile
import time

import torch

from dataset import lm
from efficiency.latency import peak_memory_mb
from efficiency.macs import AUTHORS_NEURON_SHARE, count_parameters, mac_ratios, unit_prices
from evaluate import zero_shot
from evaluate.perplexity import perplexity
from pipelines import protocol
from pipelines.commands import decoder_result_stem
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import checkpoint_identity, load_config, load_model, load_tokenizer, save_pruned
from prerequisites.hub import resolve_checkpoint
from prerequisites.streaming import load_streamed
from pipelines.flags import (SEARCH_PASSES, describe_correction, search_lines, search_record, search_start, sketch_of,
                             sketch_record)
from prune.search import SearchSettings, load_widths, save_widths
from prune.stat import END_TO_END, stat_prune
from quantize.sequential import quantize_model
from quantize.storage import QUANTIZED, is_quantized, save_quantized, weights_size_mb
from utils.cache import DenseCache, fingerprint
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
    """The checkpoint's local folder: --model_dir (a folder or a hub id), else models/<model_name>,
    else the hub id --model_name names (a paper name such as opt-125M stands for its facebook/
    id). Hub ids are downloaded when online and read from the local cache when offline."""
    if args.model_dir is not None:
        return resolve_checkpoint(args.model_dir)
    path = os.path.join("models", args.model_name)
    if os.path.isdir(path):
        return path
    hub_id = HUB_IDS.get(args.model_name, args.model_name if "/" in args.model_name else None)
    if hub_id is None:
        raise UserError(f"checkpoint not found: {path}")
    return resolve_checkpoint(hub_id)


def resolve_dtype(name, device):
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_corpora(args, calibrates):
    """Fill --calib_task and --eval_tasks (canonical names): `--task X` stands for calibrating
    on X and scoring on X (and, X standard, on the other standard sets available), as it always
    has; otherwise the protocol's (c4; wikitext2, ptb, c4: those of them that are available).
    Returns the two settings, and the notes to print once the inputs are all checked: the
    default sets left out, and a warning when a run calibrates on a corpus it also scores."""
    default_evals = args.eval_tasks is None and args.task is None
    if args.task is not None:
        task = lm.canonical_task(args.task)
        args.calib_task = args.calib_task or task
        if args.eval_tasks is None:
            args.eval_tasks = lm.available_eval_sets(task, args.data_dir)
    protocol.resolve(args, protocol.CORPORA)
    args.calib_task = lm.canonical_task(args.calib_task)
    evals = list(dict.fromkeys(lm.canonical_task(t) for t in args.eval_tasks))
    notes = []
    if default_evals:
        missing = [t for t in evals if not lm.eval_available(t, args.data_dir)]
        evals = [t for t in evals if t not in missing]
        if not evals:
            raise UserError(f"none of the default evaluation sets ({', '.join(missing)}) is available: put their "
                            f"test files in --data_dir, or name the sets with --eval_tasks (e.g. austen, text)")
        if missing:
            notes.append(f"note: {', '.join(missing)} not available, not scored (put the test files in --data_dir)")
    args.eval_tasks = evals
    if calibrates and args.calib_task in evals:
        notes.append(f"warning: calibrating and scoring on the same corpus ({args.calib_task}): in-domain "
                     f"calibration flatters perplexity (the paper calibrates on c4 and scores wikitext2, ptb and c4)")
    return {"calib_task": args.calib_task, "eval_tasks": evals}, notes


def tell(notes):
    for note in notes:
        print(note, file=sys.stderr)


def load(args, stack, calibrate=True):
    """(device, model on the CPU, its adapter, tokenizer, eval windows per set, calibration
    batches (None unless calibrate), seqlen, LayerStore or None). Needs resolve_corpora first.

    The model stays on the CPU: layers move to the device one at a time. With --low_memory its
    layers stay on disk between their turns (the store's folder is removed when `stack` closes).
    """
    device = resolve_device(args.device)
    source = model_source(args)
    tokenizer = load_tokenizer(source)
    config = load_config(source)
    seqlen = min(args.seqlen, getattr(config, "max_position_embeddings", args.seqlen))
    # the data first: a missing or malformed file should fail before a large model loads
    windows = {}
    for name, tokens in lm.eval_tokens(None, tokenizer, args.data_dir, tasks=args.eval_tasks).items():
        cap = lm.MAX_EVAL_WINDOWS.get(name)
        if args.eval_samples:
            cap = min(cap or args.eval_samples, args.eval_samples)
        windows[name] = lm.eval_windows(tokens, seqlen, cap)
    calib_batches = calibration_batches(args, tokenizer, seqlen) if calibrate else None
    if args.lm_eval_tasks:
        zero_shot.check_tasks(args.lm_eval_tasks, args.lm_eval_include_path)
    model, store = load_weights(args, source, config, device, stack)
    adapter = adapter_for(model)
    if not adapter.is_decoder:
        raise UserError(f"{args.model_name} is not a decoder language model ({type(model).__name__})")
    return device, model, adapter, tokenizer, windows, calib_batches, seqlen, store


def load_weights(args, source, config, device, stack):
    """(model, None), or with --low_memory (model with empty layers, the LayerStore that fills
    them): prerequisites/streaming.py."""
    dtype = resolve_dtype(args.dtype, device)
    if not args.low_memory:
        return load_model(source, dtype=dtype, formats=[QUANTIZED]), None
    if is_quantized(config):
        raise UserError("--low_memory reads ordinary (dense or pruned) checkpoints, not packed quantized ones")
    # the layers that change are written beside --save_model when its folder exists (putting them
    # there at the end is then a link, not a copy), else in the system's temporary folder
    parent = os.path.dirname(os.path.abspath(args.save_model)) if getattr(args, "save_model", None) else None
    folder = stack.enter_context(tempfile.TemporaryDirectory(
        prefix=".stat-layers-", dir=parent if parent and os.path.isdir(parent) else None))
    return load_streamed(source, folder, dtype)


def calibration_batches(args, tokenizer, seqlen):
    windows = lm.calibration_windows(args.calib_task, tokenizer, args.nsamples, seqlen, args.seed, args.data_dir)
    return lm.window_batches(windows, args.batch_size)


def perplexities(model, adapter, windows, device, batch_size, label, store=None):
    return {name: perplexity(model, adapter, w, device, batch_size, desc=f"{label} {name}", store=store)
            for name, w in windows.items()}


def dense_perplexities(args, model, adapter, windows, device, store=None):
    """The dense model's perplexity on each set, from the cache when it has it; and whether all
    of them came from it."""
    cache = DenseCache(args.output_dir, enabled=not args.no_cache)
    identity = checkpoint_identity(model_source(args))
    dtype = str(next(model.parameters()).dtype)
    ppl, hits = {}, []
    for name, w in windows.items():
        key = {"kind": "decoder", "checkpoint": identity, "set": name, "windows": fingerprint(w.numpy().tobytes()),
               "shape": list(w.shape), "batch_size": args.batch_size, "device": device.type, "dtype": dtype}
        ppl[name], hit = cache.get_or_compute(
            key, lambda: perplexity(model, adapter, w, device, args.batch_size, desc=f"dense {name}", store=store))
        hits.append(hit)
    if any(hits):
        print(f"dense perplexity from the cache ({cache.folder}; --no_cache to score again): "
              f"{', '.join(n for n, hit in zip(windows, hits) if hit)}")
    return ppl, all(hits)


def run_settings(args, device):
    """The settings of a run that are not the protocol's, for its record."""
    return {"batch_size": args.batch_size, "dtype": str(resolve_dtype(args.dtype, device)).replace("torch.", "")}


# ---------------------------------------------------------------------------------------------
# Pruning and quantizing, each adding to the run's record


def search_settings(args, tokenizer, seqlen):
    """--allocation search or measured: its fitness windows (the --search_windows windows of the
    calibration corpus drawn after the calibration windows, with the same seed), budget and start
    (search_start); else None."""
    if args.allocation not in END_TO_END:
        return None
    windows = lm.calibration_windows(args.calib_task, tokenizer, args.nsamples + args.search_windows, seqlen,
                                     args.seed, args.data_dir)[args.nsamples:]
    budget = args.search_tokens or SEARCH_PASSES * args.nsamples * seqlen
    # a window per batch: the search's first stage scores a quarter of them
    return SearchSettings(lm.window_batches(windows, 1), budget, args.seed, search_start(args, protocol.DECODER))


def prune_and_report(args, knobs, device, model, adapter, tokenizer, windows, calib_batches, seqlen, store=None):
    """Dense and pruned perplexities, and the record so far (μ = 1: no pruning)."""
    set_seed(args.seed)
    params_dense = count_parameters(model)
    dense_shape = adapter.shape(model)
    prices = unit_prices(adapter, dense_shape, seqlen, "decoder")
    widths = load_widths(args.widths, dense_shape, prices[args.mac_split], args.mu) if args.widths else None
    ppl_dense, dense_cached = dense_perplexities(args, model, adapter, windows, device, store)
    allocation = factor = result = search = None
    start = time.perf_counter()
    if args.mu < 1.0:
        search = search_settings(args, tokenizer, seqlen)
        result = stat_prune(model, adapter, calib_batches, prices[args.mac_split], args.mu, device,
                            method=args.method, allocation=None if widths else args.allocation,
                            calibration=args.calibration, widths=widths, search=search,
                            sketch=sketch_of(args, seqlen), score_fraction=args.score_fraction,
                            neuron_share=AUTHORS_NEURON_SHARE["decoder"] if args.mac_split == "authors" else None,
                            store=store, correction=args.correction if args.method == "stat" else "self",
                            pricing=args.pricing, factor=args.factor, width_multiple=args.width_multiple,
                            more_tokens=lambda growth: f"--nsamples {math.ceil(args.nsamples * growth)} "
                                                       f"at --seqlen {seqlen}")
        allocation, factor = result.allocation, result.factor
    prune_seconds = time.perf_counter() - start
    if args.save_widths:
        attn_units, neurons = adapter.shape(model)
        save_widths(args.save_widths, attn_units, neurons, model_name=args.model_name, mu=args.mu,
                    allocation=allocation, seed=args.seed)
    ppl_pruned = (perplexities(model, adapter, windows, device, args.batch_size, "pruned", store) if args.mu < 1
                  else ppl_dense)
    attn_units, neurons = adapter.shape(model)
    mac_ratio, mac_ratio_authors = mac_ratios(prices, dense_shape, (attn_units, neurons))
    return {
        "model_name": args.model_name, "task": args.task, "method": args.method, "protocol": args.protocol,
        **knobs, "allocation": allocation, "factor": factor, "width_multiple": args.width_multiple,
        **sketch_record(sketch_of(args, seqlen)),
        **run_settings(args, device), "mu": args.mu,
        "mac_ratio": mac_ratio, "mac_ratio_authors": mac_ratio_authors,
        "seed": args.seed, "nsamples": args.nsamples, "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned, "dense_cached": dense_cached,
        "heads_per_layer": attn_units, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model), "prune_seconds": prune_seconds,
        "low_memory": args.low_memory, **search_record(result, search, args.nsamples * seqlen),
    }


def quantize_settings(args):
    return {"wbits": args.wbits, "groupsize": args.groupsize, "sym": args.sym, "act_order": args.act_order,
            "nearest": args.nearest, "percdamp": args.percdamp, "gptq_reference": args.gptq_reference,
            "true_sequential": args.true_sequential}


def describe_quantizer(args):
    """E.g. 'GPTQ 4-bit (groupsize 128, asymmetric, act_order, percdamp 0.01)'."""
    details = ["per row" if args.groupsize == -1 else f"groupsize {args.groupsize}",
               "symmetric" if args.sym else "asymmetric"]
    if not args.nearest:
        details += (["act_order"] if args.act_order else []) + [f"percdamp {args.percdamp}"]
        details += (["true sequential"] if args.true_sequential else [])
    details += (["as the reference code"] if args.gptq_reference else [])
    return f"{'RTN' if args.nearest else 'GPTQ'} {args.wbits}-bit ({', '.join(details)})"


def quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record, store=None):
    """Quantize, evaluate, save; adds to `record` and returns the lines of the result block."""
    start = time.perf_counter()
    quantized = quantize_model(model, adapter, calib_batches, device, args.wbits, args.groupsize, args.sym,
                               args.act_order, args.percdamp, args.nearest, reference=args.gptq_reference,
                               true_sequential=args.true_sequential, store=store)
    record.update(quantize_settings(args), quantize_seconds=time.perf_counter() - start)
    record["ppl_quantized"] = perplexities(model, adapter, windows, device, args.batch_size, "quantized", store)
    lines = [f"quantize time: {record['quantize_seconds']:.1f} s ({len(quantized)} linear layers)"]
    if args.save_model:
        save_quantized(model, quantized, args.save_model, tokenizer, quantize_settings(args), store)
        dense_mb, quantized_mb = weights_size_mb(model_source(args)), weights_size_mb(args.save_model)
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
    path = model_source(args)
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
    append_result(decoder_result_stem(args), record, block)
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
        f"MACs kept: {record['mac_ratio']:.4f} of dense (target {record['mu']}); "
        f"{record['mac_ratio_authors']:.4f} priced with the authors' split",
        *ppl_lines(record),
        f"heads per layer: {record['heads_per_layer']}",
        f"neurons per layer: {record['neurons_per_layer']}",
        f"parameters: dense {record['params_dense'] / 1e6:.2f}M  pruned {record['params_pruned'] / 1e6:.2f}M",
        f"prune time: {record['prune_seconds']:.1f} s, peak memory {record['peak_memory_mb']:.0f} MB",
        *search_lines(record, "windows"),
    ]


def finish(args, record, device):
    """The keys every decoder record ends with."""
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now(),
                  **provenance(args.command))


# ---------------------------------------------------------------------------------------------
# The three runs


def corrections(args, record):
    return f", {describe_correction(record)}" if args.method == "stat" else ""


def calibration_note(args, seqlen):
    return f"calibrated on {args.calib_task} ({args.nsamples} x {seqlen} tokens, seed {args.seed})"


def prune(args):
    """prune_opt.py: prune with STAT, report dense and pruned perplexity (and zero-shot scores)."""
    corpora, notes = resolve_corpora(args, calibrates=True)
    knobs = {**corpora, **protocol.resolve(args, protocol.DECODER)}
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(args, stack)
        tell(notes)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        record = prune_and_report(args, knobs, device, model, adapter, tokenizer, windows, calib_batches, seqlen,
                                  store)
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
        f"prune_opt: protocol {args.protocol}, method {args.method} (allocation {record['allocation']}, "
        f"calibration {args.calibration}, MAC split {args.mac_split}{corrections(args, record)}), mu {args.mu}, "
        f"{calibration_note(args, seqlen)}, device {device}{', low memory' if args.low_memory else ''}",
        *pruning_lines(record),
        *zero_shot_lines(record),
    ])
    return record


def quantize(args):
    """quantize_opt.py: prune with STAT (unless μ = 1), then quantize; report all three."""
    corpora, notes = resolve_corpora(args, calibrates=True)
    knobs = {**corpora, **protocol.resolve(args, protocol.DECODER, protocol.QUANTIZE)}
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(args, stack)
        tell(notes)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        record = prune_and_report(args, knobs, device, model, adapter, tokenizer, windows, calib_batches, seqlen,
                                  store)
        quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calib_batches, record,
                                             store)
        if args.lm_eval_tasks:
            checkpoints = [("dense", dense_dir), ("quantized", temporary_checkpoint(model, tokenizer, stack, store))]
            del model, store  # lm-eval loads its own copies, in another process
            record.update(zero_shot_scores(args, device, checkpoints))
    pruning = (f"STAT mu {args.mu} (method {args.method}, allocation {record['allocation']}, "
               f"calibration {args.calibration}, MAC split {args.mac_split}{corrections(args, record)})" if args.mu < 1
               else "no pruning (mu 1)")
    finish(args, record, device)
    write(args, record, [
        f"quantize_opt: protocol {args.protocol}, {pruning}, then {describe_quantizer(args)}; "
        f"{calibration_note(args, seqlen)}, device {device}{', low memory' if args.low_memory else ''}",
        *pruning_lines(record),
        *quantize_lines,
        *zero_shot_lines(record),
    ])
    return record


def evaluate(args):
    """opt_eval.py: dense perplexity; with --wbits (or --protocol paper), the dense-then-quantized
    baseline."""
    set_seed(args.seed)
    quantize_knobs = protocol.resolve(args, protocol.DENSE_QUANTIZE)
    quantizes = args.wbits is not None
    # RTN needs no calibration data.
    calibrates = quantizes and not args.nearest
    knobs, notes = resolve_corpora(args, calibrates)
    memory = ", low memory" if args.low_memory else ""
    with contextlib.ExitStack() as stack:
        device, model, adapter, tokenizer, windows, calib_batches, seqlen, store = load(args, stack,
                                                                                        calibrate=calibrates)
        tell(notes)
        dense_dir = lm_eval_dense_dir(args, model, tokenizer, stack)
        ppl_dense, dense_cached = dense_perplexities(args, model, adapter, windows, device, store)
        record = {
            "model_name": args.model_name, "task": args.task, "method": "dense", "protocol": args.protocol, **knobs,
            **(quantize_knobs if quantizes else {}), **run_settings(args, device), "mu": 1.0, "seed": args.seed,
            "seqlen": seqlen, "eval_samples": args.eval_samples, "ppl_dense": ppl_dense, "dense_cached": dense_cached,
            "params_dense": count_parameters(model), "low_memory": args.low_memory,
        }
        lines = [f"opt_eval: dense, windows of {seqlen} tokens, device {device}{memory}"]
        quantize_lines = []
        checkpoints = [("dense", dense_dir)]
        if quantizes:
            record["nsamples"] = args.nsamples if calibrates else 0
            quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows,
                                                 calib_batches or [], record, store)
            data = calibration_note(args, seqlen) if calibrates else "no calibration data"
            lines = [f"opt_eval: protocol {args.protocol}, dense, then {describe_quantizer(args)}; {data}, "
                     f"device {device}{memory}"]
            if args.lm_eval_tasks:
                checkpoints.append(("quantized", temporary_checkpoint(model, tokenizer, stack, store)))
        if args.lm_eval_tasks:
            del model, store  # lm-eval loads its own copies, in another process
            record.update(zero_shot_scores(args, device, checkpoints))
    finish(args, record, device)
    write(args, record, [*lines, *ppl_lines(record), *quantize_lines, *zero_shot_lines(record)])
    return record
