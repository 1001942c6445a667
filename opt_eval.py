"""Dense perplexity of a decoder language model on every available evaluation set, and with
--wbits the dense-then-quantized baseline (GPTQ, or RTN with --nearest; no pruning).

    python opt_eval.py --model_name opt-125M --seed 0 [--task wikitext2] [--data_dir D]
    python opt_eval.py --model_name opt-125M --seed 0 --wbits 4 [--groupsize 128] [--save_model DIR]

The GPTQ protocol (DESIGN.md §6), layer by layer. The quantization flags are those of
quantize_opt.py. Results: output/opt/<model_name>.txt and .jsonl.
"""
from pipelines import decoder
from pipelines.flags import add_quantize_arguments, check_lm_eval_arguments, check_quantize_arguments, decoder_parser
from utils.cli import parse_command, run_main


def parse_args(argv=None):
    p = decoder_parser(__doc__)
    add_quantize_arguments(p, wbits_required=False)
    args = parse_command(p, argv, "opt_eval.py")
    check_quantize_arguments(p, args)
    check_lm_eval_arguments(p, args)
    return args


def main(argv=None):
    return decoder.evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
