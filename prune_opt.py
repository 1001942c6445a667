"""Prune a decoder language model (OPT, Llama-family) with STAT and report perplexity.

    python prune_opt.py --model_name opt-125M --task wikitext2 --mu 0.9 --seed 0

Calibrates on --nsamples random windows of the task's training text, prunes to a fraction μ
of the attention and FFN multiply-accumulates (S = the window length), and reports perplexity
(GPTQ protocol) on every available evaluation set, dense and pruned. Everything runs layer by
layer, so only one layer is on the device at a time. Results: output/opt/<model_name>.txt and
.jsonl.
"""
from pipelines import decoder
from pipelines.flags import add_mu_argument, add_stat_arguments, check_stat_arguments, decoder_parser
from utils.cli import output_dir, parse_command, run_main


def parse_args(argv=None):
    p = decoder_parser(__doc__)
    add_mu_argument(p)
    add_stat_arguments(p)
    p.add_argument("--save_model", type=output_dir, metavar="DIR", help="write the pruned model here")
    args = parse_command(p, argv, "prune_opt.py")
    check_stat_arguments(p, args)
    return args


def main(argv=None):
    return decoder.prune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
