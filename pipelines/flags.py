"""The flags the entry scripts share, in groups: how STAT prunes, what a decoder run reads,
how GPTQ quantizes. Each script builds its parser from these groups and its own flags."""
import argparse

from dataset import lm
from prune.allocation import ALLOCATORS
from prune.stat import CALIBRATIONS, METHODS, NEURON_ERRORS
from prune.units import Correction
from quantize.gptq import check_groupsize
from utils.cli import ArgumentParser, fraction_value, mu_value, output_dir, positive_int, seed_value

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
    p.add_argument("--correction", choices=CORRECTIONS, default="self",
                   help="what each pruned layer's correction reproduces: self (its own output on the inputs "
                        "the pruned model gives it) or dense (the dense model's output: the dense inputs are "
                        "carried alongside, a second forward pass)")
    p.add_argument("--residual_correction", action=argparse.BooleanOptionalAction, default=False,
                   help="with --correction dense: each corrected projection also absorbs the gap of the residual "
                        "stream it writes into (x_dense - x_pruned)")
    p.add_argument("--bias_compensation", choices=BIAS_COMPENSATIONS, default="off",
                   help="keep a constant column in every ID and fold the dropped units' mean into the consumer's "
                        "bias: existing (consumers that have a bias), add (also give the others one), off")
    p.add_argument("--correction_ridge", type=ridge_value, default="id",
                   help="ridge of the corrections, relative to the mean diagonal of the kept activations' Gram, "
                        "shrinking them towards plain selection: id (the ID's own, 1e-8), a number, or heldout "
                        "(chosen per block on every 4th calibration batch)")
    p.add_argument("--neuron_errors", choices=NEURON_ERRORS, default="id",
                   help="how greedy/ffn_greedy price neurons: id (the scaled ID's error) or output (the error in "
                        "the FFN's output, as heads are priced)")


CORRECTIONS = ("self", "dense")
BIAS_COMPENSATIONS = ("off", "existing", "add")


def ridge_value(text):
    if text in ("id", "heldout"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"correction ridge must be id, heldout or a positive number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"correction ridge must be positive, got {value}")
    return value


def check_stat_arguments(p, args):
    """One-line errors (exit 2) for STAT flag combinations that cannot work."""
    if args.residual_correction and args.correction != "dense":
        p.error("--residual_correction needs --correction dense")


def correction_of(args):
    """The prune.units.Correction that the flags ask for."""
    return Correction(target=args.correction, residual=args.residual_correction,
                      bias=args.bias_compensation != "off", add_bias=args.bias_compensation == "add",
                      ridge=None if args.correction_ridge == "id" else args.correction_ridge)


def stat_options(args):
    """stat_prune's keyword arguments from the STAT flags."""
    return {"method": args.method, "allocation": args.allocation, "calibration": args.calibration,
            "sketch_rows": args.sketch, "score_fraction": args.score_fraction, "correction": correction_of(args),
            "neuron_errors": args.neuron_errors}


def describe_correction(args):
    """E.g. 'correction dense + residual, bias existing, ridge heldout, neuron errors output'."""
    target = args.correction + (" + residual" if args.residual_correction else "")
    return (f"correction {target}, bias {args.bias_compensation}, ridge {args.correction_ridge}, "
            f"neuron errors {args.neuron_errors}")


def stat_record(args):
    """The STAT flags a run's record keeps (besides method and allocation)."""
    return {"calibration": args.calibration, "score_fraction": args.score_fraction, "correction": args.correction,
            "residual_correction": args.residual_correction, "bias_compensation": args.bias_compensation,
            "correction_ridge": args.correction_ridge, "neuron_errors": args.neuron_errors}


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
    p.add_argument("--output_dir", type=output_dir, default="output",
                   help="results go to <output_dir>/opt/<model_name>.txt|.jsonl")
    return p


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
