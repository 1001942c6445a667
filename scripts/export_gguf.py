"""Write a Llama-family checkpoint of this repository, pruned or dense, as a GGUF file that stock
llama.cpp runs (architecture `deci`: every layer with its own head count and FFN width).

    python scripts/export_gguf.py output/smollm2-mu0.8 smollm2-mu0.8.gguf --outtype f16

CHECKPOINT is a folder (a pruned checkpoint saved with --save_model, or a dense one) or a hub id
in the local cache. --outtype: f32 (exact), f16, or q8_0 (rows that Q8_0's 32-value blocks do not
divide stay f16). For K-quants (Q4_K_M...), run llama.cpp's quantizer on the f32 or f16 file
(benchmarks/bench_gguf.py shows how, through llama-cpp-python). The file is written whole or
not at all. Prints the per-layer widths written.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prerequisites.checkpoint import load_config, load_model, load_tokenizer  # noqa: E402
from prerequisites.gguf_export import OUTTYPES, check_exportable, export_gguf  # noqa: E402
from prerequisites.hub import resolve_checkpoint  # noqa: E402
from utils.cli import ArgumentParser, parse_command, run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder, or a hub id in the local cache")
    p.add_argument("out", help="the GGUF file to write")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f32",
                   help="type of the 2-D weights (norms and biases stay f32); default f32")
    return parse_command(p, argv, "scripts/export_gguf.py")


def check_writable(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise UserError(f"cannot write {path}")


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.out)
    folder = resolve_checkpoint(args.checkpoint)
    check_exportable(load_config(folder))  # before the weights load
    model = load_model(folder)
    tokenizer = load_tokenizer(folder)
    heads, heads_kv, widths = export_gguf(model, tokenizer, folder, args.out, args.outtype,
                                          name=os.path.basename(os.path.normpath(args.checkpoint)))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, {args.outtype}, {len(widths)} layers)")
    print(f"heads:    {heads}\nkv heads: {heads_kv}\nffn:      {widths}")


if __name__ == "__main__":
    run_main(main)
