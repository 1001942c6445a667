"""Zero-shot accuracy of a pruned real model with lm-evaluation-harness, offline.

    python benchmarks/bench_zero_shot.py [--mu 0.8] [--questions 100]

No lm-eval task data installs offline, so this builds a multiple-choice task from the shipped
Austen text and defines it in a local YAML file (the way any own task is added with
--lm_eval_include_path): each question is the first 12 words of a sentence of prideprejudice,
the novel the demo evaluates perplexity on; the choices are its true next 6 words and the 6
words after 3 other random places in the novel. Then it runs

    prune_opt.py --model_name smollm2-135m --task austen --mu MU --nsamples 32 --seqlen 512
                 --eval_samples 10 --lm_eval_tasks austen_next --lm_eval_include_path <the task>

(the demo's pruning, SmolLM2-135M) and prints the result block: dense and pruned accuracy
side by side. Everything it writes goes to a temporary folder, deleted at the end.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset.lm import AUSTEN_DIR, AUSTEN_EVAL  # noqa: E402
from evaluate.zero_shot import write_choice_task  # noqa: E402
from scripts.convert_smollm2 import DEFAULT_OUT, convert  # noqa: E402

TASK = "austen_next"


def questions(text, count, seed=0):
    """{question: 12 words, choices: the true next 6 words and 3 spans of 6 words from elsewhere}."""
    words = text.split()
    starts = [i + 1 for i, w in enumerate(words[:-20]) if re.search(r"[.!?]$", w)]  # sentence starts
    r = random.Random(seed)
    docs = []
    for start in r.sample(starts, count):
        true = " ".join(words[start + 12:start + 18])
        others = [" ".join(words[j:j + 6]) for j in r.sample(range(len(words) - 6), 3)]
        choices = others + [true]
        r.shuffle(choices)
        docs.append({"question": " ".join(words[start:start + 12]), "choices": choices, "label": choices.index(true)})
    return docs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mu", default="0.8")
    p.add_argument("--questions", type=int, default=100)
    args = p.parse_args()
    model_dir = convert(DEFAULT_OUT)
    with open(os.path.join(AUSTEN_DIR, f"{AUSTEN_EVAL}.txt"), encoding="utf-8") as f:
        docs = questions(f.read(), args.questions)
    with tempfile.TemporaryDirectory(prefix="bench-zero-shot-") as folder:
        write_choice_task(folder, TASK, docs)
        print(f"task {TASK}: {len(docs)} questions, e.g. {json.dumps(docs[0])}", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "prune_opt.py"), "--model_name", "smollm2-135m",
                        "--model_dir", model_dir, "--task", "austen", "--mu", args.mu, "--seed", "0", "--nsamples",
                        "32", "--seqlen", "512", "--eval_samples", "10", "--device", "cpu", "--output_dir",
                        os.path.join(folder, "output"), "--lm_eval_tasks", TASK, "--lm_eval_include_path", folder],
                       check=True)


if __name__ == "__main__":
    main()
