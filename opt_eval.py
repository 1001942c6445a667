"""Dense perplexity of a decoder language model on every available evaluation set.

    python opt_eval.py --model_name opt-125M --seed 0 [--task wikitext2] [--data_dir D]

The GPTQ protocol (DESIGN.md §6), layer by layer. Results: output/opt/<model_name>.txt and .jsonl.
"""
from efficiency.latency import peak_memory_mb
from efficiency.macs import count_parameters
from utils.cli import run_main, set_seed
from utils.decoder_cli import decoder_parser, load, now, perplexities, ppl_lines, write


def parse_args(argv=None):
    return decoder_parser(__doc__).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    device, model, adapter, tokenizer, windows, seqlen = load(args)
    record = {
        "model_name": args.model_name, "task": args.task, "method": "dense", "mu": 1.0, "seed": args.seed,
        "seqlen": seqlen, "eval_samples": args.eval_samples,
        "ppl_dense": perplexities(model, adapter, windows, device, args.batch_size, "dense"),
        "params_dense": count_parameters(model),
    }
    record.update(peak_memory_mb=peak_memory_mb(device), device=str(device), time=now())
    write(args, record, [f"opt_eval: dense, windows of {seqlen} tokens, device {device}", *ppl_lines(record)])
    return record


if __name__ == "__main__":
    run_main(main)
