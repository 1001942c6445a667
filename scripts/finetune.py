"""Fine-tune a BERT-family encoder (BERT, DistilBERT, MiniLM...) on a GLUE task or SQuAD 1.1/2.0,
ready for prune_bert.py.

    python scripts/finetune.py --model_name_or_path bert-base-uncased --task_name mnli
    python prune_bert.py --model_name bert-base-uncased --task_name mnli --mu 0.5

The usual recipe: AdamW (lr 2e-5, weight decay 0.01), 3 epochs, batch 32, a linear warm-up
over the first 10 % of the steps then a linear decay to 0, gradients clipped to norm 1, max
length 128 (SST-2, CoLA, movie-sentiment: 64) or 384 with stride 128 for SQuAD; every setting
is a flag. --model_name_or_path is a local folder or a Hugging Face hub id (downloaded when
online, read from the local cache when HF_HUB_OFFLINE=1). The result, with its tokenizer and a
finetune.json that says how it was made, goes to models/<model_name>/<task_name>/ (model_name:
the last part of --model_name_or_path unless given), written whole at the end. Prints the dev
metric, computed as prune_bert.py computes it.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluate.tasks import task_names  # noqa: E402
from pipelines import finetune  # noqa: E402
from pipelines.flags import parser  # noqa: E402
from utils.cli import (non_negative_float, output_dir, parse_command, positive_float, positive_int,  # noqa: E402
                       run_main, seed_value)


def warmup_value(text):
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"the warm-up is a fraction of the steps in [0, 1), got {value}")
    return value


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--model_name_or_path", required=True, help="base encoder: a local folder or a hub id")
    p.add_argument("--task_name", required=True, help=f"one of: {', '.join(task_names())}")
    p.add_argument("--model_name", help="folder name under models/ (default: the last part of --model_name_or_path)")
    p.add_argument("--output_dir", type=output_dir,
                   help="where the fine-tuned model goes (default: models/<model_name>/<task_name>)")
    p.add_argument("--data_dir", help="folder with the task's original files (GLUE TSV, SQuAD JSON); default: hub")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--lr", type=positive_float, default=2e-5, help="peak learning rate of AdamW")
    p.add_argument("--batch_size", type=positive_int, default=32, help="training batch size")
    p.add_argument("--max_length", type=positive_int,
                   help="training sequence length (default: the task's: 128; SST-2, CoLA, movie-sentiment 64; "
                        "SQuAD 384)")
    p.add_argument("--doc_stride", type=positive_int, default=128, help="SQuAD: overlap of a context's windows")
    p.add_argument("--warmup", type=warmup_value, default=0.1, help="fraction of the steps of linear warm-up")
    p.add_argument("--weight_decay", type=non_negative_float, default=0.01, help="AdamW's decoupled weight decay")
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="clip gradients to this norm (0: off)")
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the head's initialisation, dropout and order")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--eval_batch_size", type=positive_int, default=64, help="batch size of the dev evaluation")
    return parse_command(p, argv, "scripts/finetune.py")


def main(argv=None):
    return finetune.finetune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
