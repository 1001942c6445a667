"""Prune a BERT-family classifier or question-answering model with STAT and score it.

    python prune_bert.py --model_name bert-base-uncased --task_name mnli --mu 0.5 --seed 0

Loads models/<model_name>/<task_name> (or --model_dir), scores the dense model on the task's
dev set, prunes to a fraction μ of the attention and FFN multiply-accumulates, scores the
pruned model, and writes a block to output/<model_name>/<task_name>.txt and one JSON line to
the .jsonl beside it.
"""
from pipelines import commands, encoder
from utils.cli import run_main


def parse_args(argv=None):
    return commands.parse("prune_bert.py", argv, __doc__)


def main(argv=None):
    return encoder.prune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
