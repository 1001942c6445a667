"""The flags the entry scripts share, in groups: how STAT prunes, what a decoder run reads,
how GPTQ quantizes. Each script builds its parser from these groups and its own flags."""
import argparse
import math
import os

from dataset import lm
from dataset.glue import SAMPLERS
from efficiency.macs import MAC_SPLITS
from pipelines import protocol
from prune.allocation import ALLOCATORS
from prune.gram import SKETCHES, Sketch
from prune.stat import CALIBRATIONS, CORRECTIONS, DENSE_TARGET_CALIBRATIONS, END_TO_END, FACTORS, METHODS, PRICINGS
from quantize.gptq import check_groupsize
from utils.cli import (ArgumentParser, existing_dir, fraction_value, mu_value, output_dir, output_file, positive_int,
                       seed_value)

WBITS = (2, 3, 4, 8)
QUANTIZE_FLAGS = ("groupsize", "sym", "act_order", "nearest", "percdamp", "save_model", "gptq_reference",
                  "true_sequential")


def parser(description):
    return ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_protocol_argument(p):
    """--protocol and --no_cache (every entry script)."""
    p.add_argument("--protocol", choices=protocol.PROTOCOLS, default="improved",
                   help="improved: what measured best here (default); paper: the authors' released code, "
                        "literally. Sets the flags marked [protocol] that are not given (pipelines/protocol.py)")
    p.add_argument("--no_cache", action="store_true",
                   help="score the dense model again even when <output_dir>/.dense_cache has its scores")


def add_stat_arguments(p):
    """The flags that choose how STAT prunes (prune_bert.py, prune_opt.py, quantize_opt.py).
    Those marked [protocol] default to None: pipelines/protocol.py fills them."""
    p.add_argument("--method", choices=METHODS, default="stat",
                   help="stat: interpolative decompositions with corrections; magnitude: same allocation, "
                        "units ranked by weight norms, no correction; kwon: Kwon et al. 2022 (Fisher importance "
                        "of a task loss, mask search, rearrangement and tuning; prune_bert.py only)")
    p.add_argument("--allocation", choices=[*ALLOCATORS, *END_TO_END],
                   help="[protocol] how the MAC budget is shared across layers: greedy (error removed per MAC; "
                        "improved, encoders), ffn_greedy (all heads kept; improved, decoders), faithful (the "
                        "authors' rule, literally; paper), uniform; search: the protocol's widths searched against "
                        "the whole model's KL to the dense model (--search_tokens); measured: greedy's knapsack, "
                        "each block's prices scaled to the KL of pruning it alone (docs/search.md)")
    p.add_argument("--calibration", choices=CALIBRATIONS,
                   help="[protocol] where the IDs are measured: sequential (improved): each layer's on the pruned "
                        "layers below; dense_ffn: FFN IDs from the dense model; one_shot (paper, decoders): all "
                        "IDs from the dense model; ffn_then_attn (paper, encoders): FFN IDs from the dense model, "
                        "FFNs pruned, then the attention IDs from that model")
    p.add_argument("--score_fraction", type=fraction_value,
                   help="[protocol] share of the calibration set that pass 1 scores the dense model on, for the "
                        "allocation (improved: 0.25 for encoders, 1 for decoders; paper 1; pass 2 always uses "
                        "all of it; 1 with --pricing heldout)")
    p.add_argument("--mac_split", choices=MAC_SPLITS,
                   help="[protocol] how units are priced for the budget: exact (improved): each model's own "
                        "MACs per head and neuron; authors (paper): the authors' fixed head/neuron share "
                        "(neurons 0.6623 of a layer for encoders, 4/7 for decoders)")
    p.add_argument("--width_multiple", type=positive_int, default=1,
                   help="every layer keeps a multiple of this many FFN neurons (or all), within the same budget: "
                        "32 for llama.cpp's Q8_0 and faster kernels, 256 for its K-quants (docs/gguf.md); default 1")
    p.add_argument("--factor", choices=FACTORS, default="auto",
                   help="who computes the pivoted Cholesky factorisations of the IDs: torch (where the Gram lies: "
                        "on a GPU it never leaves it), lapack (scipy's dpstrf, on the host), auto (torch on CUDA, "
                        "lapack on the CPU, where it measured faster); the record says which ran")
    p.add_argument("--sketch", choices=SKETCHES,
                   help="[protocol] compress the activations before each Gram product (approximate; its draws "
                        "follow --seed): gaussian (paper, decoders, as the authors' OPT code): each window to "
                        "--sketch_rows rows S·A, S Gaussian; count: each batch to --sketch_rows rows (CountSketch); "
                        "improved: none (exact Grams)")
    p.add_argument("--sketch_rows", type=positive_int, metavar="ROWS",
                   help="rows each window (gaussian) or batch (count) is compressed to; decoders' gaussian default: "
                        "the authors' 100 rows per 2048-token window, scaled to --seqlen (ceil(100 * seqlen / 2048))")
    add_correction_arguments(p)


# how each pruned block is refitted and what pass 1 prices on (docs/corrections.md); both are
# protocol knobs
CORRECTION_FLAGS = ("correction", "pricing")
# the ones that shape the allocation only, which magnitude shares with stat
ALLOCATION_FLAGS = ("pricing",)


SEARCH_PASSES = 10  # the default budget of --allocation search, in dense passes of the calibration tokens
SEARCH_EXAMPLES = 128  # encoders: the training examples a candidate's KL is measured on (8 batches)
SEARCH_WINDOWS = 8  # decoders: the held-out calibration windows a candidate's KL is measured on


def add_search_arguments(p, encoder=False):
    """--allocation search's budget and fitness data, and widths saved or given by hand."""
    p.add_argument("--search_tokens", type=positive_int, metavar="TOKENS",
                   help="--allocation search: forward work to spend, in tokens through the whole model (a "
                        "candidate run from layer i of L counts (L - i)/L per token); default 10 dense passes of "
                        "the calibration tokens")
    if encoder:
        p.add_argument("--search_examples", type=positive_int, default=SEARCH_EXAMPLES, metavar="N",
                       help="--allocation search or measured: training examples that the calibration sample "
                            "does not draw (SQuAD: features of such examples), on which a candidate's KL to the "
                            "dense model's class (or answer span) distribution is measured "
                            f"(default {SEARCH_EXAMPLES})")
    else:
        p.add_argument("--search_windows", type=positive_int, default=SEARCH_WINDOWS, metavar="N",
                       help="--allocation search or measured: windows of the calibration corpus, drawn after "
                            "the calibration windows and held out of the IDs' fit, on which a candidate's KL is "
                            f"measured (default {SEARCH_WINDOWS})")
    p.add_argument("--widths", metavar="FILE",
                   help="prune to these widths (a JSON object with heads_per_layer and neurons_per_layer: a "
                        "--save_widths file, or a run's record) instead of allocating; they must fit mu")
    p.add_argument("--save_widths", type=output_file, metavar="FILE",
                   help="write the widths the run pruned to (e.g. those --allocation search found), for --widths")


def search_start(args, family):
    """The allocator --allocation search or measured starts from: measured, greedy (its knapsack
    trades heads against neurons, which the measured prices make safe on decoders too:
    docs/search.md); search, the protocol's allocation for the family (protocol.ENCODER, DECODER)."""
    return "greedy" if args.allocation == "measured" else protocol.default(family, "allocation", args.protocol)


def check_search_arguments(p, args):
    """One-line errors (exit 2) for the search and widths flags that cannot work as given."""
    search = args.allocation in END_TO_END
    if args.search_tokens is not None and args.allocation != "search":
        p.error("--search_tokens applies to --allocation search")
    given = [f"--{flag}" for flag in ("search_windows", "search_examples")
             if getattr(args, flag, None) != p.get_default(flag)]
    if given and not search:
        p.error(f"{', '.join(given)} apply to --allocation search or measured")
    if search and args.method != "stat":
        p.error(f"--allocation {args.allocation} builds its candidates from STAT's IDs: --method stat only")
    if search and getattr(args, "low_memory", False):
        p.error(f"--allocation {args.allocation} keeps the dense model's layers in memory: not with --low_memory")
    if args.allocation == "measured" and args.protocol == "paper":
        p.error("--allocation measured scales greedy's knapsack prices (the improved protocol's), "
                "not the paper protocol's faithful rule")
    if args.widths is not None:
        if args.method == "kwon":
            p.error("--widths prunes with --method stat or magnitude, not kwon")
        if args.allocation is not None or args.width_multiple != 1:
            p.error("--widths replaces the allocation: not with --allocation or --width_multiple")
        if not os.path.isfile(args.widths):
            p.error(f"--widths: no such file: {args.widths}")


def search_record(result, settings, calibration_tokens):
    """The run record's "search" or "measured" (neither with another allocation), from a PruneResult."""
    if result is None or settings is None:
        return {}
    if result.search is not None:
        return {"search": result.search.record(settings, calibration_tokens)}
    held_out = sum(len(batch["input_ids"]) for batch in settings.batches)
    return {"measured": {**result.measured, "start": settings.start, "windows": held_out,
                         "dense_passes": result.measured["layer_tokens"] / calibration_tokens}}


def search_lines(record, held_out):
    """The results block's line on the search; held_out names what it was judged on (windows, examples)."""
    if "measured" in record:
        m = record["measured"]
        return [f"measured prices: the KL to dense of each block alone pruned ({m['start']}), on {m['windows']} "
                f"held-out {held_out}, {m['dense_passes']:.1f} dense passes of the calibration tokens, "
                f"{m['seconds']:.0f} s"]
    if "search" not in record:
        return []
    s = record["search"]
    return [f"search: KL to dense {s['kl_start']:.4f} ({s['start']}) -> {s['kl']:.4f} on {s['windows']} held-out "
            f"{held_out}, {s['generations']} generations ({s['improvements']} improved), {s['dense_passes']:.1f} "
            f"dense passes of the calibration tokens, {s['seconds']:.0f} s"]


def add_correction_arguments(p):
    """What each pruned block's correction reproduces, and what pass 1 prices on."""
    p.add_argument("--correction", choices=CORRECTIONS,
                   help="[protocol] what each pruned block's correction reproduces: self (paper, improved): its "
                        "own output on the inputs the pruned layers below give it, so the error arriving from "
                        "below is carried, not undone; dense: the dense model's output plus the residual stream's "
                        "gap x_dense - x_pruned (the dense model's activations are carried alongside through each "
                        "layer before it is pruned: about twice the pruning time; measured ahead on MiniLM at "
                        "mu 0.2 only; needs --calibration sequential or dense_ffn)")
    p.add_argument("--pricing", choices=PRICINGS,
                   help="[protocol] what pass 1 prices each truncation on, for the allocation: insample (paper; "
                        "improved for encoders: the calibration batches the IDs are fitted on) or heldout (improved "
                        "for decoders, measured ahead on SmolLM2 at every budget: cross-validated over 3 folds of "
                        "the batches, batch b in fold b mod 3, each fold priced by the ID fitted on the other two; "
                        "pass 1 then scores every batch)")


def check_stat_arguments(p, args, table):
    """One-line errors (exit 2) for flags that cannot work together, or that the method would
    ignore; `table`: the protocol table (pipelines/protocol.py) that will fill the flags left
    unset."""
    def value(knob):
        given = getattr(args, knob)
        return protocol.default(table, knob, args.protocol) if given is None else given

    if args.method == "magnitude":  # ranks by weight norms and never corrects (the allocation is STAT's)
        given = [f"--{flag}" for flag in CORRECTION_FLAGS
                 if flag not in ALLOCATION_FLAGS and getattr(args, flag) is not None]
        if given:
            p.error(f"{', '.join(given)} apply to --method stat, not magnitude")
    if args.method != "kwon" and value("pricing") == "heldout":
        if args.score_fraction not in (None, 1.0):
            p.error("--score_fraction: --pricing heldout scores pass 1 on every calibration batch")
        args.score_fraction = 1.0  # what pass 1 will score, so that the record says so
    sketch = value("sketch")
    if args.sketch_rows and sketch is None:
        p.error("--sketch_rows needs --sketch gaussian or count")
    if sketch and not args.sketch_rows and (sketch == "count" or table is protocol.ENCODER):
        p.error(f"--sketch {sketch} needs --sketch_rows" + (" (the authors' rows per window are for decoders' "
                                                            "windows)" if sketch == "gaussian" else ""))
    dense_target = args.method == "stat" and value("correction") == "dense"
    if dense_target and value("calibration") not in DENSE_TARGET_CALIBRATIONS:
        origin = "" if args.calibration else f" (the {args.protocol} protocol's)"
        p.error(f"--correction dense needs --calibration {' or '.join(DENSE_TARGET_CALIBRATIONS)}, "
                f"not {value('calibration')}{origin}")


AUTHORS_SKETCH = (100, 2048)  # the authors' OPT code: 100 Gaussian rows per 2048-token window


def sketch_of(args, window=None):
    """The prune.gram.Sketch the (resolved) flags ask for, or None; `window`: the decoders'
    window length, which scales the authors' rows when --sketch_rows is not given."""
    if args.sketch is None:
        return None
    rows = args.sketch_rows or math.ceil(AUTHORS_SKETCH[0] * window / AUTHORS_SKETCH[1])
    return Sketch(args.sketch, rows, args.seed)


def sketch_record(sketch):
    """The record keys of a run's sketch."""
    return {"sketch_rows": sketch.rows if sketch else None, "sketch_seed": sketch.seed if sketch else None}


def describe_correction(record):
    """How a run's blocks were corrected, priced and measured, in words, from its record: e.g.
    'correction self, pricing insample, factor lapack, sketch gaussian 25 rows, widths in multiples of 32'."""
    factor = f", factor {record['factor']}" if record.get("factor") else ""
    sketch = f", sketch {record['sketch']} {record['sketch_rows']} rows" if record.get("sketch") else ""
    widths = f", widths in multiples of {record['width_multiple']}" if (record.get("width_multiple") or 1) > 1 else ""
    return f"correction {record['correction']}, pricing {record['pricing']}{factor}{sketch}{widths}"


def add_sampler_argument(p):
    """How an encoder's calibration examples are drawn (prune_bert.py)."""
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="[protocol] how the calibration examples are drawn: distinct (improved): different "
                        "examples; with_replacement (paper): np.random.choice, as Kwon et al. and the authors")


# what kwon ignores: it draws its own labelled sample (--num_samples) as Kwon et al. do
STAT_ONLY_FLAGS = ("allocation", "calibration", "score_fraction", "sketch", "sketch_rows", "sampler", "factor",
                   "width_multiple", "sample_batch_size") + CORRECTION_FLAGS


def add_kwon_arguments(p):
    """prune_bert.py's flag for --method kwon."""
    p.add_argument("--num_samples", type=positive_int, default=2048,
                   help="--method kwon: labelled training examples (SQuAD: features) drawn with replacement, "
                        "as Kwon et al. draw them, in mini-batches of 32 (SQuAD: 12)")


def check_method_arguments(p, args, encoder=True):
    """One-line errors (exit 2) for flags that the chosen method would silently ignore, and
    for kwon on a decoder."""
    if not encoder:
        if args.method == "kwon":
            p.error("--method kwon prunes encoders (prune_bert.py): its importance is the gradient of a task "
                    "loss on labelled examples")
        return
    if args.method == "kwon":
        given = [f"--{flag}" for flag in STAT_ONLY_FLAGS if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"{', '.join(given)}: not used by --method kwon (it draws its own sample: --num_samples)")
    elif args.num_samples != p.get_default("num_samples"):
        p.error("--num_samples applies to --method kwon (stat and magnitude: --sample_batch_size)")


def add_mu_argument(p):
    p.add_argument("--mu", type=mu_value, required=True, help="fraction of attention+FFN MACs to keep, in (0, 1]")


def decoder_parser(description):
    """The flags every decoder script takes: model, data, windows, device, output."""
    p = parser(description)
    add_protocol_argument(p)
    p.add_argument("--model_name", required=True,
                   help="models/<model_name>, a paper name (opt-125M, opt-1.3B, ...) or a hub id (facebook/opt-125m)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the calibration windows")
    p.add_argument("--model_dir", help="checkpoint folder or hub id (default: models/<model_name>)")
    p.add_argument("--data_dir", help="folder with local corpus files (wiki.*.raw, ptb.*.txt, C4 shards, "
                                      "train.txt/test.txt)")
    corpora = ", ".join(lm.LM_TASKS + tuple(lm.PAPER_NAMES))
    p.add_argument("--task", help="shorthand: calibrate on this corpus and score on it (and, for a standard corpus, "
                                  "on the other standard sets available), as before --calib_task existed")
    p.add_argument("--calib_task", help=f"[protocol] calibration corpus (default c4, as the authors and GPTQ): "
                                        f"{corpora}")
    p.add_argument("--eval_tasks", nargs="+", metavar="TASK",
                   help="[protocol] perplexity on these sets (default wikitext2 ptb c4, those available)")
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
    p.add_argument("--wbits", type=int, choices=WBITS,
                   help="bits per weight" + (" (required unless --protocol paper: 4)" if wbits_required
                                             else " (default: no quantization; --protocol paper: 4)"))
    p.add_argument("--groupsize", type=groupsize_value,
                   help="[protocol] columns that share a scale and zero point (-1: one group per row; "
                        "improved -1, paper 1024)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction,
                   help="[protocol] symmetric grid, zero point in the middle (paper: opt_eval.py yes, "
                        "quantize_opt.py no; improved: no)")
    p.add_argument("--act_order", action="store_true",
                   help="quantize the columns in order of decreasing Hessian diagonal (GPTQ only)")
    p.add_argument("--nearest", action="store_true", help="round to nearest (RTN baseline) instead of GPTQ")
    p.add_argument("--percdamp", type=percdamp_value, default=0.01,
                   help="Hessian dampening, as a fraction of its mean diagonal")
    p.add_argument("--save_model", type=output_dir, metavar="DIR",
                   help="write the quantized model (packed low-bit weights) here")
    p.add_argument("--gptq_reference", action=argparse.BooleanOptionalAction,
                   help="[protocol] GPTQ as the reference implementation runs it (quantize/gptq.py: its "
                        "symmetric grid, its grids fitted before dead inputs are zeroed and on stale group "
                        "weights); improved no, paper yes")
    p.add_argument("--true_sequential", action=argparse.BooleanOptionalAction,
                   help="[protocol] quantize a layer's linears group by group (Q/K/V, output, FFN in, FFN out), "
                        "each calibrated on the layer with the earlier groups quantized (no in both protocols)")


def check_quantize_arguments(p, args, wbits_required=False):
    """One-line errors (exit 2) for flag combinations that would be silently ignored."""
    if args.wbits is None and protocol.default(protocol.QUANTIZE, "wbits", args.protocol) is None:
        if wbits_required:
            p.error("--wbits is required (or --protocol paper, which quantizes to 4 bits)")
        given = [f"--{flag}" for flag in QUANTIZE_FLAGS if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"{', '.join(given)} need --wbits")
    if args.nearest and args.act_order:
        p.error("--act_order applies to GPTQ, not to --nearest (round to nearest)")
