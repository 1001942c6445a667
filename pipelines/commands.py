"""The flags of each run script and where its results go, in one place.

Each of prune_bert.py, prune_opt.py, quantize_opt.py and opt_eval.py parses its command line
with `parse` here; sweep.py reads the same table to check a grid against a script's real flags
and to find the result file each grid point would write, without importing the script (entry
scripts never import each other) and without loading the models' libraries.
"""
import os
from typing import Callable, NamedTuple, Optional

from evaluate.tasks import task_names
from pipelines import protocol
from pipelines.flags import (add_kwon_arguments, add_mu_argument, add_protocol_argument, add_quantize_arguments,
                             add_sampler_argument, add_search_arguments, add_stat_arguments, check_lm_eval_arguments,
                             check_method_arguments, check_quantize_arguments, check_search_arguments,
                             check_stat_arguments, decoder_parser, parser)
from utils.cli import output_dir, parse_command, positive_int, seed_value


def prune_bert_parser(description=None):
    p = parser(description)
    add_protocol_argument(p)
    p.add_argument("--model_name", required=True, help="name of the model (folder under models/, and in output/)")
    p.add_argument("--task_name", required=True, help=f"one of: {', '.join(task_names())}")
    add_mu_argument(p)
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the calibration sample")
    p.add_argument("--sample_batch_size", type=positive_int, default=512, help="number of calibration examples")
    p.add_argument("--model_dir", help="checkpoint folder or hub id (default: models/<model_name>/<task_name>)")
    p.add_argument("--data_dir", help="folder with the task's original files (GLUE TSV, SQuAD JSON)")
    p.add_argument("--output_dir", type=output_dir, default="output", help="where results are written")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--save_model", type=output_dir, metavar="DIR", help="write the pruned model here")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size of calibration and evaluation")
    add_stat_arguments(p)
    add_search_arguments(p, encoder=True)
    add_sampler_argument(p)
    add_kwon_arguments(p)
    return p


def prune_opt_parser(description=None):
    p = decoder_parser(description)
    add_mu_argument(p)
    add_stat_arguments(p)
    add_search_arguments(p)
    p.add_argument("--save_model", type=output_dir, metavar="DIR", help="write the pruned model here")
    return p


def quantize_opt_parser(description=None):
    p = decoder_parser(description)
    add_mu_argument(p)  # μ = 1: no pruning
    add_stat_arguments(p)
    add_search_arguments(p)
    add_quantize_arguments(p, wbits_required=True)
    return p


def opt_eval_parser(description=None):
    p = decoder_parser(description)
    add_quantize_arguments(p, wbits_required=False)
    return p


def encoder_result_stem(args):
    """Where prune_bert.py writes: <stem>.txt and <stem>.jsonl."""
    return os.path.join(args.output_dir, args.model_name, args.task_name)


def decoder_result_stem(args):
    """Where the decoder scripts write: <stem>.txt and <stem>.jsonl."""
    return os.path.join(args.output_dir, "opt", args.model_name)


def check_prune_bert(p, args):
    check_method_arguments(p, args)
    check_search_arguments(p, args)
    check_stat_arguments(p, args, protocol.ENCODER)


def check_prune_opt(p, args):
    check_method_arguments(p, args, encoder=False)
    check_search_arguments(p, args)
    check_stat_arguments(p, args, protocol.DECODER)
    check_lm_eval_arguments(p, args)


def check_quantize_opt(p, args):
    check_quantize_arguments(p, args, wbits_required=True)
    check_method_arguments(p, args, encoder=False)
    check_search_arguments(p, args)
    check_stat_arguments(p, args, protocol.DECODER)
    check_lm_eval_arguments(p, args)


def check_opt_eval(p, args):
    check_quantize_arguments(p, args)
    check_lm_eval_arguments(p, args)


class Command(NamedTuple):
    parser: Callable  # description -> ArgumentParser
    check: Optional[Callable]  # (parser, args): one-line errors for combinations argparse cannot see
    result_stem: Callable  # args -> <stem> of the <stem>.txt and <stem>.jsonl a run appends to


COMMANDS = {
    "prune_bert.py": Command(prune_bert_parser, check_prune_bert, encoder_result_stem),
    "prune_opt.py": Command(prune_opt_parser, check_prune_opt, decoder_result_stem),
    "quantize_opt.py": Command(quantize_opt_parser, check_quantize_opt, decoder_result_stem),
    "opt_eval.py": Command(opt_eval_parser, check_opt_eval, decoder_result_stem),
}


def parse(script, argv=None, description=None):
    """The parsed flags of `script` (sys.argv[1:] when argv is None), with `args.command` set
    for the run's record; bad flags exit with one line and status 2."""
    command = COMMANDS[script]
    p = command.parser(description)
    p.prog = script  # also when sweep.py checks a grid with it
    args = parse_command(p, argv, script)
    if command.check is not None:
        command.check(p, args)
    return args
