"""Prune a BERT-family classifier or question-answering model with STAT and score it.

    python prune_bert.py --model_name bert-base-uncased --task_name mnli --mu 0.5 --seed 0

Loads models/<model_name>/<task_name> (or --model_dir), scores the dense model on the task's
dev set, prunes to a fraction μ of the attention and FFN multiply-accumulates, scores the
pruned model, and writes a block to output/<model_name>/<task_name>.txt and one JSON line to
the .jsonl beside it.
"""
from evaluate.tasks import task_names
from pipelines import encoder
from pipelines.flags import add_mu_argument, add_stat_arguments, check_stat_arguments, parser
from utils.cli import output_dir, parse_command, positive_int, run_main, seed_value


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--model_name", required=True, help="name of the model (folder under models/, and in output/)")
    p.add_argument("--task_name", required=True, help=f"one of: {', '.join(task_names())}")
    add_mu_argument(p)
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the calibration sample")
    p.add_argument("--sample_batch_size", type=positive_int, default=512, help="number of calibration examples")
    p.add_argument("--model_dir", help="checkpoint folder (default: models/<model_name>/<task_name>)")
    p.add_argument("--data_dir", help="folder with the task's original files (GLUE TSV, SQuAD JSON)")
    p.add_argument("--output_dir", type=output_dir, default="output", help="where results are written")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--save_model", type=output_dir, metavar="DIR", help="write the pruned model here")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size of calibration and evaluation")
    add_stat_arguments(p)
    args = parse_command(p, argv, "prune_bert.py")
    check_stat_arguments(p, args)
    return args


def main(argv=None):
    return encoder.prune(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
