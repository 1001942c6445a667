"""Dense perplexity of a decoder language model on every available evaluation set, and with
--wbits the dense-then-quantized baseline (GPTQ, or RTN with --nearest; no pruning).

    python opt_eval.py --model_name opt-125M --seed 0 [--task wikitext2] [--data_dir D]
    python opt_eval.py --model_name opt-125M --seed 0 --wbits 4 [--groupsize 128] [--save_model DIR]

The GPTQ protocol (DESIGN.md §6), layer by layer. The quantization flags are those of
quantize_opt.py. Results: output/opt/<model_name>.txt and .jsonl.
"""
from efficiency.latency import peak_memory_mb
from efficiency.macs import count_parameters
from quantize_opt import add_quantize_arguments, check_quantize_arguments, describe_quantizer, quantize_and_report
from utils.cli import run_main, set_seed
from utils.decoder_cli import decoder_parser, load, perplexities, ppl_lines, write
from utils.results import now


def parse_args(argv=None):
    p = decoder_parser(__doc__)
    add_quantize_arguments(p, wbits_required=False)
    args = p.parse_args(argv)
    check_quantize_arguments(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    # RTN needs no calibration data.
    device, model, adapter, tokenizer, windows, calibration, seqlen = load(
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
        quantize_lines = quantize_and_report(args, device, model, adapter, tokenizer, windows, calibration or [],
                                             record)
        data = ("no calibration data" if args.nearest else
                f"calibrated on {args.task} ({args.nsamples} x {seqlen} tokens, seed {args.seed})")
        lines = [f"opt_eval: dense, then {describe_quantizer(args)}; {data}, device {device}"]
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now())
    write(args, record, [*lines, *ppl_lines(record), *quantize_lines])
    return record


if __name__ == "__main__":
    run_main(main)
