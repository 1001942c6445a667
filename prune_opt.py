"""Prune a decoder language model (OPT, Llama-family) with STAT and report perplexity.

    python prune_opt.py --model_name opt-125M --task wikitext2 --mu 0.9 --seed 0

Calibrates on --nsamples random windows of the task's training text, prunes to a fraction μ
of the attention and FFN multiply-accumulates (S = the window length), and reports perplexity
(GPTQ protocol) on every available evaluation set, dense and pruned. Everything runs layer by
layer, so only one layer is on the device at a time. Results: output/opt/<model_name>.txt and
.jsonl.
"""
from pipelines import commands, decoder
from utils.cli import run_main


def parse_args(argv=None):
    return commands.parse("prune_opt.py", argv, __doc__)


def main(argv=None):
    return decoder.prune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
