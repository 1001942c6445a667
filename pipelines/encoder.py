"""Encoder runs (prune_bert.py): load a fine-tuned classifier or QA model, score it, prune it
with STAT, score it again, and write output/<model_name>/<task_name>.*."""
import os

from efficiency.latency import measure_latency
from efficiency.macs import adapter_costs, count_parameters, model_macs
from evaluate.tasks import check_checkpoint, make_task, task_names
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_config, load_model, load_tokenizer, save_pruned
from pipelines.flags import describe_correction, stat_options, stat_record
from prune.stat import stat_prune
from utils.cli import require_dir, resolve_device, set_seed
from utils.errors import UserError
from utils.results import append_result, now, provenance


def format_block(r, metric_names):
    def pair(name):
        return f"{name}: dense {r['metrics']['dense'][name]:.4f}  pruned {r['metrics']['pruned'][name]:.4f}"

    lines = [
        f"== {r['model_name']} / {r['task_name']}  {r['time']} ==",
        f"method {r['method']} (allocation {r['allocation']}, calibration {r['calibration']}, "
        f"{r['correction_summary']}), mu {r['mu']}, "
        f"seed {r['seed']}, {r['sample_batch_size']} calibration examples, device {r['device']}",
        f"MACs kept: {r['mac_ratio']:.4f} of dense (target {r['mu']})",
        *[pair(name) for name in metric_names],
        f"heads per layer: {r['heads_per_layer']}",
        f"neurons per layer: {r['neurons_per_layer']}",
        f"parameters: dense {r['params_dense'] / 1e6:.2f}M  pruned {r['params_pruned'] / 1e6:.2f}M",
        f"latency (batch of {r['latency_batch']}): dense {r['latency_dense_ms']:.1f} ms  "
        f"pruned {r['latency_pruned_ms']:.1f} ms  ({r['latency_pruned_ms'] / r['latency_dense_ms']:.2f}x)",
        f"prune time: {r['prune_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def prune(args):
    """Everything prune_bert.py does, from its parsed flags; returns the record."""
    device = resolve_device(args.device)
    set_seed(args.seed)
    if args.task_name not in task_names():
        raise UserError(f"unknown task {args.task_name!r} (known tasks: {', '.join(task_names())})")
    model_dir = require_dir(args.model_dir or os.path.join("models", args.model_name, args.task_name), "checkpoint")

    config = load_config(model_dir)
    check_checkpoint(args.task_name, config)
    adapter_for(config)  # an unsupported family fails before the data loads
    tokenizer = load_tokenizer(model_dir)
    task = make_task(args.task_name, tokenizer, args.data_dir, args.batch_size)
    # drawn now: a sample larger than the training set fails before the model loads
    calibration_sample = task.calibration_sample(args.sample_batch_size, args.seed)
    model = load_model(model_dir, device=device)
    adapter = adapter_for(model)

    print(f"scoring the dense model on {args.task_name} ...")
    dense = task.evaluate(model, device)
    params_dense = count_parameters(model)
    latency_batch = task.latency_batch(model)
    latency_dense = measure_latency(model, latency_batch, device)
    costs = adapter_costs(adapter, task.mac_seq_len)
    dense_macs = model_macs(*adapter.shape(model), costs)

    calib_batches = task.batch_calibration(model, calibration_sample)
    result = stat_prune(model, adapter, calib_batches, costs, args.mu, device, **stat_options(args))

    print("scoring the pruned model ...")
    pruned = task.evaluate(model, device)
    attn_units, neurons = adapter.shape(model)
    record = {
        "model_name": args.model_name, "task_name": args.task_name, "method": args.method,
        "allocation": result.allocation, **stat_record(args), "correction_summary": describe_correction(args),
        "mu": args.mu, "mac_ratio": model_macs(attn_units, neurons, costs) / dense_macs,
        "seed": args.seed, "sample_batch_size": args.sample_batch_size,
        "metric_name": task.metric_name, "dense_metric": dense[task.metric_name],
        "pruned_metric": pruned[task.metric_name], "metrics": {"dense": dense, "pruned": pruned},
        "heads_per_layer": attn_units, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model),
        "prune_seconds": result.seconds, "latency_batch": int(latency_batch["input_ids"].shape[0]),
        "latency_dense_ms": latency_dense, "latency_pruned_ms": measure_latency(model, latency_batch, device),
        "device": str(device), "time": now(), **provenance(args.command),
    }
    if args.save_model:
        save_pruned(model, args.save_model, tokenizer)
        record["saved_to"] = args.save_model
    block = format_block(record, [k for k in dense if isinstance(dense[k], float)])
    append_result(os.path.join(args.output_dir, args.model_name, args.task_name), record, block)
    print(block)
    return record
