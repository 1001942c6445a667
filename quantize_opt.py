"""Prune a decoder language model (OPT, Llama-family) with STAT, then quantize it with GPTQ.

    python quantize_opt.py --model_name opt-125M --task wikitext2 --mu 0.9 --seed 0 --wbits 4 [--groupsize 128]

Prunes to a fraction μ of the attention and FFN multiply-accumulates as prune_opt.py does
(μ = 1: no pruning), then quantizes the weights of every linear layer inside the transformer
layers to --wbits bits, layer by layer, each layer calibrated on the outputs of the quantized
layers below it (the same calibration windows as the pruning). Reports perplexity on every
available evaluation set: dense, pruned and quantized. --save_model writes the packed integer
codes with their per-group scales and zero points (load the folder with
prerequisites.checkpoint.load_model(dir, formats=[quantize.storage.QUANTIZED])) and reports
its size on disk against the dense checkpoint's. Results: output/opt/<model_name>.txt and .jsonl.
"""
from pipelines import commands, decoder
from utils.cli import run_main


def parse_args(argv=None):
    return commands.parse("quantize_opt.py", argv, __doc__)


def main(argv=None):
    return decoder.quantize(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
