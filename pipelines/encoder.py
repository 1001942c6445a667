"""Encoder runs (prune_bert.py): load a fine-tuned classifier or QA model, score it, prune it
(STAT, magnitude, or Kwon et al.'s method), score it again, and write
output/<model_name>/<task_name>.*."""
import math
import os

from efficiency.latency import measure_latency
from efficiency.macs import AUTHORS_NEURON_SHARE, count_parameters, mac_ratios, unit_prices
from evaluate.tasks import check_checkpoint, make_task, task_names
from pipelines import protocol
from pipelines.commands import encoder_result_stem
from pipelines.flags import (CORRECTION_FLAGS, SEARCH_PASSES, describe_correction, search_lines, search_record,
                            search_start, sketch_of, sketch_record)
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import checkpoint_identity, load_config, load_model, load_tokenizer, save_pruned
from prerequisites.hub import resolve_checkpoint
from prune.kwon import kwon_prune
from prune.search import SearchSettings, load_widths, save_widths
from prune.stat import END_TO_END, stat_prune
from utils.cache import DenseCache
from utils.cli import resolve_device, set_seed
from utils.errors import UserError
from utils.results import append_result, now, provenance


def format_block(r, metric_names):
    def pair(name):
        return f"{name}: dense {r['metrics']['dense'][name]:.4f}  pruned {r['metrics']['pruned'][name]:.4f}"

    corrections = f", {describe_correction(r)}" if r.get("correction") else ""  # none for kwon
    lines = [
        f"== {r['model_name']} / {r['task_name']}  {r['time']} ==",
        f"protocol {r['protocol']}: method {r['method']} (allocation {r['allocation']}, calibration "
        f"{r['calibration']}, MAC split {r['mac_split']}{corrections}), mu {r['mu']}, seed {r['seed']}, "
        f"{r['sample_batch_size']} calibration examples ({r['sampler'].replace('_', ' ')}), device {r['device']}",
        f"MACs kept: {r['mac_ratio']:.4f} of dense (target {r['mu']}); "
        f"{r['mac_ratio_authors']:.4f} priced with the authors' split",
        *[pair(name) for name in metric_names],
        f"heads per layer: {r['heads_per_layer']}",
        f"neurons per layer: {r['neurons_per_layer']}",
        f"parameters: dense {r['params_dense'] / 1e6:.2f}M  pruned {r['params_pruned'] / 1e6:.2f}M",
        f"latency (batch of {r['latency_batch']}): dense {r['latency_dense_ms']:.1f} ms  "
        f"pruned {r['latency_pruned_ms']:.1f} ms  ({r['latency_pruned_ms'] / r['latency_dense_ms']:.2f}x)",
        f"prune time: {r['prune_seconds']:.1f} s",
        *search_lines(r, "examples"),
    ]
    return "\n".join(lines)


def dense_scores(args, model_dir, task, model, device):
    """The dense model's metrics on the task, from the cache when it has them."""
    key = {"kind": "encoder", "checkpoint": checkpoint_identity(model_dir), "task": args.task_name,
           "eval_data": task.eval_fingerprint(), "batch_size": args.batch_size, "device": device.type,
           "dtype": str(next(model.parameters()).dtype)}
    cache = DenseCache(args.output_dir, enabled=not args.no_cache)
    metrics, cached = cache.get_or_compute(key, lambda: task.evaluate(model, device))
    if cached:
        print(f"dense scores from the cache ({cache.path(key)}; --no_cache to score again)")
    return metrics, cached


def prune(args):
    """Everything prune_bert.py does, from its parsed flags; returns the record."""
    knobs = protocol.resolve(args, protocol.ENCODER)
    device = resolve_device(args.device)
    set_seed(args.seed)
    if args.task_name not in task_names():
        raise UserError(f"unknown task {args.task_name!r} (known tasks: {', '.join(task_names())})")
    # a local folder, or a hub id (downloaded, or read from the cache when offline)
    model_dir = resolve_checkpoint(args.model_dir or os.path.join("models", args.model_name, args.task_name))

    config = load_config(model_dir)
    check_checkpoint(args.task_name, config)
    adapter_for(config)  # an unsupported family fails before the data loads
    tokenizer = load_tokenizer(model_dir)
    task = make_task(args.task_name, tokenizer, args.data_dir, args.batch_size)
    # drawn now: a sample larger than the training set fails before the model loads
    kwon = args.method == "kwon"
    if kwon:  # Kwon et al.'s own labelled draw, with replacement
        calibration_sample, n_calibration = task.labelled_sample(args.num_samples, args.seed), args.num_samples
        knobs.update(calibration="mask_tuning", score_fraction=None, sampler="with_replacement",
                     **dict.fromkeys(CORRECTION_FLAGS))
    else:
        calibration_sample = task.calibration_sample(args.sample_batch_size, args.seed, args.sampler)
        n_calibration = args.sample_batch_size
    model = load_model(model_dir, device=device)
    adapter = adapter_for(model)

    print(f"scoring the dense model on {args.task_name} ...")
    dense, dense_cached = dense_scores(args, model_dir, task, model, device)
    params_dense = count_parameters(model)
    latency_batch = task.latency_batch(model)
    latency_dense = measure_latency(model, latency_batch, device)
    dense_shape = adapter.shape(model)
    prices = unit_prices(adapter, dense_shape, task.mac_seq_len, "encoder")

    widths = load_widths(args.widths, dense_shape, prices[args.mac_split], args.mu) if args.widths else None
    search = calibration_tokens = None
    if not kwon:
        calibration_tokens = sum(len(item["input_ids"]) for item in calibration_sample)
    if args.allocation in END_TO_END:
        held_out = task.search_batches(model, args.search_examples, args.seed, n_calibration, args.sampler)
        search = SearchSettings(held_out, args.search_tokens or SEARCH_PASSES * calibration_tokens, args.seed,
                                search_start(args, protocol.ENCODER))

    if kwon:
        result = kwon_prune(model, adapter, task.labelled_batches(model, calibration_sample), prices[args.mac_split],
                            args.mu, device, classification=task.classification)
    else:
        calib_batches = task.batch_calibration(model, calibration_sample)
        result = stat_prune(model, adapter, calib_batches, prices[args.mac_split], args.mu, device,
                            method=args.method, allocation=None if widths else args.allocation,
                            calibration=args.calibration, widths=widths, search=search,
                            sketch=sketch_of(args), score_fraction=args.score_fraction,
                            neuron_share=AUTHORS_NEURON_SHARE["encoder"] if args.mac_split == "authors" else None,
                            correction=args.correction if args.method == "stat" else "self",
                            pricing=args.pricing, factor=args.factor, width_multiple=args.width_multiple,
                            more_tokens=lambda growth: "--sample_batch_size "
                                                       f"{math.ceil(args.sample_batch_size * growth)}")

    if args.save_widths:
        save_widths(args.save_widths, *adapter.shape(model), model_name=args.model_name, task_name=args.task_name,
                    mu=args.mu, allocation=result.allocation, seed=args.seed)
    print("scoring the pruned model ...")
    pruned = task.evaluate(model, device)
    attn_units, neurons = adapter.shape(model)
    mac_ratio, mac_ratio_authors = mac_ratios(prices, dense_shape, (attn_units, neurons))
    record = {
        "model_name": args.model_name, "task_name": args.task_name, "method": args.method,
        "protocol": args.protocol, **knobs, "allocation": result.allocation, "factor": result.factor or None,
        "width_multiple": args.width_multiple,
        **sketch_record(None if kwon else sketch_of(args)),
        "batch_size": args.batch_size, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "mu": args.mu, "mac_ratio": mac_ratio, "mac_ratio_authors": mac_ratio_authors,
        "seed": args.seed, "sample_batch_size": n_calibration, "dense_cached": dense_cached,
        "metric_name": task.metric_name, "dense_metric": dense[task.metric_name],
        "pruned_metric": pruned[task.metric_name], "metrics": {"dense": dense, "pruned": pruned},
        "heads_per_layer": attn_units, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model),
        "prune_seconds": result.seconds, "latency_batch": int(latency_batch["input_ids"].shape[0]),
        "latency_dense_ms": latency_dense, "latency_pruned_ms": measure_latency(model, latency_batch, device),
        "device": str(device), "time": now(), **provenance(args.command),
        **search_record(None if kwon else result, search, calibration_tokens),
    }
    if args.save_model:
        save_pruned(model, args.save_model, tokenizer)
        record["saved_to"] = args.save_model
    block = format_block(record, [k for k in dense if isinstance(dense[k], float)])
    append_result(encoder_result_stem(args), record, block)
    print(block)
    return record
