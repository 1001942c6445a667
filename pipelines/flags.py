"""The flags the entry scripts share, in groups: how STAT prunes, what a decoder run reads,
how GPTQ quantizes. Each script builds its parser from these groups and its own flags."""
import argparse

from dataset import lm
from prune.allocation import ALLOCATORS
from prune.stat import CALIBRATIONS, METHODS
from quantize.gptq import check_groupsize
from utils.cli import ArgumentParser, existing_dir, fraction_value, mu_value, output_dir, positive_int, seed_value

WBITS = (2, 3, 4, 8)
QUANTIZE_FLAGS = ("groupsize", "sym", "act_order", "nearest", "percdamp", "save_model")


def parser(description):
    return ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_stat_arguments(p):
    """The flags that choose how STAT prunes (prune_bert.py, prune_opt.py, quantize_opt.py)."""
    p.add_argument("--method", choices=METHODS, default="stat",
                   help="stat: interpolative decompositions with corrections; magnitude: same allocation, "
                        "units ranked by weight norms, no correction")
    p.add_argument("--allocation", choices=list(ALLOCATORS),
                   help="how the MAC budget is shared across layers: greedy (error removed per MAC; the "
                        "default for encoders), ffn_greedy (all heads kept; the default for decoders), "
                        "faithful (the rule of the authors' code), uniform")
    p.add_argument("--calibration", choices=CALIBRATIONS, default="sequential",
                   help="sequential: each layer's IDs measured on the pruned layers below; dense_ffn: FFN IDs "
                        "from the dense model; one_shot: all IDs from the dense model (fastest)")
    p.add_argument("--score_fraction", type=fraction_value, default=0.25,
                   help="share of the calibration set that pass 1 scores the dense model on (for the "
                        "allocation; pass 2 always uses all of it)")
    p.add_argument("--sketch", type=positive_int, metavar="ROWS",
                   help="CountSketch each batch's activations to this many rows before its Gram product "
                        "(approximate; for very long calibration sets)")


def add_mu_argument(p):
    p.add_argument("--mu", type=mu_value, required=True, help="fraction of attention+FFN MACs to keep, in (0, 1]")


def decoder_parser(description):
    """The flags every decoder script takes: model, data, windows, device, output."""
    p = parser(description)
    p.add_argument("--model_name", required=True,
                   help="models/<model_name>, a paper name (opt-125M, opt-1.3B, ...) or a cached hub id")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the calibration windows")
    p.add_argument("--model_dir", help="checkpoint folder (default: models/<model_name>)")
    p.add_argument("--data_dir", help="folder with local corpus files (wiki.*.raw, ptb.*.txt, C4 shards, "
                                      "train.txt/test.txt)")
    p.add_argument("--task", default="wikitext2", help=f"calibration corpus: {', '.join(lm.LM_TASKS)}")
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=positive_int, default=2048,
                   help="window length (capped at the model's context)")
    p.add_argument("--eval_samples", type=positive_int, help="evaluate on the first N windows only (default all)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="weights' dtype (auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--batch_size", type=positive_int, default=4, help="windows per forward pass")
    p.add_argument("--low_memory", action="store_true",
                   help="keep each layer's weights in the checkpoint's safetensors files until its turn, and write "
                        "changed layers to disk as they are done: host memory holds about one layer, the "
                        "calibration activations and the embeddings, not the model (for models larger than memory)")
    p.add_argument("--output_dir", type=output_dir, default="output",
                   help="results go to <output_dir>/opt/<model_name>.txt|.jsonl")
    add_lm_eval_arguments(p)
    return p


def add_lm_eval_arguments(p):
    """Zero-shot scores from lm-evaluation-harness (every decoder script)."""
    p.add_argument("--lm_eval_tasks", nargs="+", metavar="TASK",
                   help="lm-eval tasks to score the dense and the compressed model on, zero-shot "
                        "(e.g. piqa arc_easy arc_challenge hellaswag winogrande)")
    p.add_argument("--lm_eval_limit", type=positive_int, metavar="N",
                   help="score the first N examples of each task only (default all)")
    p.add_argument("--lm_eval_batch_size", type=positive_int, default=8, help="lm-eval's batch size")
    p.add_argument("--lm_eval_include_path", type=existing_dir, metavar="DIR",
                   help="a folder of your own lm-eval task YAML files, besides lm-eval's own")


LM_EVAL_FLAGS = ("lm_eval_limit", "lm_eval_batch_size", "lm_eval_include_path")


def check_lm_eval_arguments(p, args):
    """A one-line error (exit 2) for lm-eval flags given without --lm_eval_tasks."""
    if not args.lm_eval_tasks:
        given = [f"--{flag}" for flag in LM_EVAL_FLAGS if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"{', '.join(given)} need --lm_eval_tasks")


def groupsize_value(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"groupsize must be -1 or a positive integer, got {text!r}")
    try:
        check_groupsize(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))
    return value


def percdamp_value(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"percdamp must be a positive number, got {text!r}")
    if not value > 0:  # zero dampening fails on any singular Hessian (dead or collinear inputs)
        raise argparse.ArgumentTypeError(f"percdamp must be positive, got {value}")
    return value


def add_quantize_arguments(p, wbits_required):
    """The quantization flags (quantize_opt.py; opt_eval.py for the dense-then-quantized baseline)."""
    p.add_argument("--wbits", type=int, choices=WBITS, required=wbits_required, help="bits per weight")
    p.add_argument("--groupsize", type=groupsize_value, default=-1,
                   help="columns that share a scale and zero point (-1: one group per row)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (zero point in the middle)")
    p.add_argument("--act_order", action="store_true",
                   help="quantize the columns in order of decreasing Hessian diagonal (GPTQ only)")
    p.add_argument("--nearest", action="store_true", help="round to nearest (RTN baseline) instead of GPTQ")
    p.add_argument("--percdamp", type=percdamp_value, default=0.01,
                   help="Hessian dampening, as a fraction of its mean diagonal")
    p.add_argument("--save_model", type=output_dir, metavar="DIR",
                   help="write the quantized model (packed low-bit weights) here")


def check_quantize_arguments(p, args):
    """One-line errors (exit 2) for flag combinations that would be silently ignored."""
    if args.wbits is None:
        given = [f"--{flag}" for flag in QUANTIZE_FLAGS if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"{', '.join(given)} need --wbits")
    if args.nearest and args.act_order:
        p.error("--act_order applies to GPTQ, not to --nearest (round to nearest)")
