"""Prune a decoder language model (OPT, Llama-family) with STAT and report perplexity.

    python prune_opt.py --model_name opt-125M --task wikitext2 --mu 0.9 --seed 0

Calibrates on --nsamples random windows of the task's training text, prunes to a fraction μ
of the attention and FFN multiply-accumulates (S = the window length), and reports perplexity
(GPTQ protocol) on every available evaluation set, dense and pruned. Everything runs layer by
layer, so only one layer is on the device at a time. Results: output/opt/<model_name>.txt and
.jsonl.
"""
import time

from efficiency.latency import peak_memory_mb
from efficiency.macs import adapter_costs, count_parameters, model_macs, shape_of
from prerequisites.checkpoint import save_pruned
from prune.pipeline import stat_prune
from utils.cli import add_stat_arguments, mu_value, output_dir, run_main, set_seed
from utils.decoder_cli import decoder_parser, load, perplexities, ppl_lines, write
from utils.results import now


def add_prune_arguments(p):
    """The pruning flags, shared with quantize_opt.py."""
    p.add_argument("--mu", type=mu_value, required=True, help="fraction of attention+FFN MACs to keep, in (0, 1]")
    add_stat_arguments(p)


def parse_args(argv=None):
    p = decoder_parser(__doc__)
    add_prune_arguments(p)
    p.add_argument("--save_model", type=output_dir, metavar="DIR", help="write the pruned model here")
    return p.parse_args(argv)


def prune_and_report(args, device, model, adapter, windows, calibration, seqlen):
    """Shared by quantize_opt.py: dense and pruned perplexities, and the record so far."""
    set_seed(args.seed)
    params_dense = count_parameters(model)
    ppl_dense = perplexities(model, adapter, windows, device, args.batch_size, "dense")
    costs = adapter_costs(adapter, seqlen)
    dense_macs = model_macs(*shape_of(model, adapter), costs)
    start = time.perf_counter()
    if args.mu < 1.0:
        stat_prune(model, adapter, calibration, costs, args.mu, device, method=args.method,
                   allocation=args.allocation, calibration=args.calibration, sketch_rows=args.sketch,
                   score_fraction=args.score_fraction)
    prune_seconds = time.perf_counter() - start
    ppl_pruned = perplexities(model, adapter, windows, device, args.batch_size, "pruned") if args.mu < 1 else ppl_dense
    heads, neurons = shape_of(model, adapter)
    return {
        "model_name": args.model_name, "task": args.task, "method": args.method, "allocation": args.allocation,
        "calibration": args.calibration, "score_fraction": args.score_fraction, "mu": args.mu,
        "mac_ratio": model_macs(heads, neurons, costs) / dense_macs,
        "seed": args.seed, "nsamples": args.nsamples, "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": ppl_dense, "ppl_pruned": ppl_pruned, "heads_per_layer": heads, "neurons_per_layer": neurons,
        "params_dense": params_dense, "params_pruned": count_parameters(model), "prune_seconds": prune_seconds,
    }


def pruning_lines(record):
    """The lines of a result block that say what pruning did (shared with quantize_opt.py)."""
    return [
        f"MACs kept: {record['mac_ratio']:.4f} of dense (target {record['mu']})",
        *ppl_lines(record),
        f"heads per layer: {record['heads_per_layer']}",
        f"neurons per layer: {record['neurons_per_layer']}",
        f"parameters: dense {record['params_dense'] / 1e6:.2f}M  pruned {record['params_pruned'] / 1e6:.2f}M",
        f"prune time: {record['prune_seconds']:.1f} s, peak memory {record['peak_memory_mb']:.0f} MB",
    ]


def main(argv=None):
    args = parse_args(argv)
    device, model, adapter, tokenizer, windows, calibration, seqlen = load(args)
    record = prune_and_report(args, device, model, adapter, windows, calibration, seqlen)
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now())
    if args.save_model:
        save_pruned(model, args.save_model, tokenizer)
        record["saved_to"] = args.save_model
    write(args, record, [
        f"prune_opt: method {args.method} (allocation {args.allocation}, calibration {args.calibration}), "
        f"mu {args.mu}, calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed}), "
        f"device {device}",
        *pruning_lines(record),
    ])
    return record


if __name__ == "__main__":
    run_main(main)
