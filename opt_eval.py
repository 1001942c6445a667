"""Dense perplexity of a decoder language model on every available evaluation set, and with
--wbits the dense-then-quantized baseline (GPTQ, or RTN with --nearest; no pruning).

    python opt_eval.py --model_name opt-125M --seed 0 [--task wikitext2] [--data_dir D]
    python opt_eval.py --model_name opt-125M --seed 0 --wbits 4 [--groupsize 128] [--save_model DIR]

The GPTQ protocol (docs/design.md §6), layer by layer. The quantization flags are those of
quantize_opt.py. Results: output/opt/<model_name>.txt and .jsonl.
"""
from pipelines import commands, decoder
from utils.cli import run_main


def parse_args(argv=None):
    return commands.parse("opt_eval.py", argv, __doc__)


def main(argv=None):
    return decoder.evaluate(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
