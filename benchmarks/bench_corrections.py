"""Benchmark how STAT corrects and prices (docs/corrections.md): the dense target and held-out
prices against today's default, in and off domain, with the data to choose on held out.

    python benchmarks/bench_corrections.py minilm  [--mus ...] [--variants ...] [--seeds 0 1 2]
    python benchmarks/bench_corrections.py smollm2 [--mus ...] [--variants ...] [--seeds 0 1 2]

A variant is a '+'-joined list of settings on top of `today` (stat_prune's defaults:
--correction self, --pricing insample, --score_fraction 0.25):
  dense            --correction dense (the dense model's output and the residual stream's gap)
  magnitude        --method magnitude
  alloc=NAME       --allocation NAME           cal=NAME   --calibration NAME
  n=N              (smollm2) N calibration windows instead of --nsamples
  sf=X             --score_fraction X
  price=NAME       --pricing NAME (insample, heldout)
  folds=N          held-out prices over N folds of the calibration batches (stat_prune's price_folds)
  sketch=KIND:ROWS --sketch KIND --sketch_rows ROWS (gaussian: rows per window; count: per batch)
  factor=NAME      --factor NAME (lapack, torch)
  search=P         --allocation search from the variant's allocation, a budget of P dense passes of the
                   calibration tokens; the KL on the 8 windows drawn after the calibration windows
                   (smollm2), on 128 training sentences the calibration sample does not draw (minilm)
  measured         --allocation measured from the variant's allocation, on the search's held-out data
  sx=N             with search or measured: N held-out training sentences (minilm, rather than 128)
                   or windows (smollm2, rather than 8)
(The variants of issue 14 that were removed in issue 20, bias, addbias, ridge=X, idridge=X,
nerr, select=dense and res apart from dense, run at commit 7ed5679.)

Every run reports the metric on the evaluation sets and on data held out of the training
text, which is what defaults are chosen on (never the evaluation sets):
- minilm (the demo classifier, movie-sentiment): dev accuracy; `select` = accuracy on 3,000
  training sentences that no calibration sample of seeds 0-4 draws (the model was fine-tuned
  on them, once).
- smollm2 (SmolLM2-135M, austen, windows of 512): perplexity on 40 windows of
  prideprejudice (in domain), on 40 windows of the movie-sentiment dev sentences joined into
  one text (out of domain; written to a temporary `--task text` data dir, train.txt = the
  calibration text, so `prune_opt.py --task text --data_dir DIR` reproduces it); `select` =
  perplexity on 24 windows of emma + mansfieldpark that no calibration window of seeds 0-4
  overlaps.
Pruning time is given in dense forward passes over the calibration set, measured in the same
process (SmolLM2: one pass at the start of every run of the script; the dense scores are kept in
output/bench_corrections/smollm2-dense.pt), and in seconds. Each run is appended to
output/bench_corrections/<model>.jsonl (minilm with --samples N other than 512:
minilm-N.jsonl); `--table` prints the tables (mean over the seeds asked
for) from that file without running anything.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset import glue, lm  # noqa: E402
from efficiency.latency import forward_seconds as dense_forward_seconds  # noqa: E402
from efficiency.macs import adapter_costs, model_macs  # noqa: E402
from evaluate.inputs import accepted_inputs  # noqa: E402
from evaluate.perplexity import perplexity  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from pipelines.flags import SEARCH_EXAMPLES, SEARCH_WINDOWS, search_record  # noqa: E402
from prune.gram import Sketch  # noqa: E402
from prune.search import SearchSettings  # noqa: E402
from prune.stat import stat_prune  # noqa: E402

OUT = os.path.join(ROOT, "output", "bench_corrections")
HELD_OUT_SEEDS = range(5)  # calibration seeds whose data the selection sets avoid
MINILM_SAMPLES = 512  # minilm: calibration examples by default, as prune_bert.py's --sample_batch_size
VARIANTS = ["today", "magnitude", "dense", "price=heldout"]


def parse_variant(name):
    """stat_prune's keyword arguments (and the calibration size) of a variant name."""
    options, nsamples = {}, None
    for part in name.split("+"):
        key, _, value = part.partition("=")
        if part == "today":
            pass
        elif part == "dense":
            options["correction"] = "dense"
        elif part == "magnitude":
            options["method"] = "magnitude"
        elif key == "alloc":
            options["allocation"] = value
        elif key == "cal":
            options["calibration"] = value
        elif key == "n":
            nsamples = int(value)
        elif key == "price":
            options["pricing"] = value
        elif key == "folds":
            options["price_folds"] = int(value)
        elif key == "sketch":
            kind, rows = value.split(":")
            options["sketch"] = Sketch(kind, int(rows))  # reseeded per run below
        elif key == "factor":
            options["factor"] = value
        elif key == "sf":
            options["score_fraction"] = float(value)
        elif key == "search":
            options["search"] = ("search", float(value))  # dense passes; made into SearchSettings per run below
        elif part == "measured":
            options["search"] = ("measured", 0.0)  # the search's held-out data, no budget
        elif key == "sx":
            options["search_examples"] = int(value)

        else:
            raise SystemExit(f"unknown variant part {part!r}")
    return options, nsamples


def dense_cache(name, key, value=None):
    """The dense model's scores, kept between runs of this benchmark (they take minutes on a
    shared CPU): read (value None; None when absent) or write them under `key`."""
    path = os.path.join(OUT, f"{name}-dense.pt")
    entries = torch.load(path) if os.path.exists(path) else {}
    key = json.dumps(key, sort_keys=True)
    if value is None:
        return entries.get(key)
    entries[key] = value
    os.makedirs(OUT, exist_ok=True)
    torch.save(entries, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_dense(model_dir):
    """(tokenizer, dense model, its adapter) of a checkpoint."""
    model = load_model(model_dir)
    return load_tokenizer(model_dir), model, adapter_for(model)


# ---------------------------------------------------------------------------------------------
# MiniLM on movie-sentiment


class MiniLM:
    higher_is_better = True

    def __init__(self, args):
        from evaluate.tasks import make_task
        from scripts.build_demo_classifier import DEFAULT_OUT, build_classifier

        self.tokenizer, self.dense, self.adapter = load_dense(build_classifier(DEFAULT_OUT))
        self.task = make_task("movie-sentiment", self.tokenizer)
        self.costs = adapter_costs(self.adapter, self.task.mac_seq_len)
        self.samples = args.samples
        self.name = records_name(args)
        self.calibrations = {}
        self.selection = self._selection_batches()
        self.dense_log_probs = None
        cached = dense_cache(self.name, {"samples": self.samples})
        if cached:
            self.dense_metrics, self.dense_log_probs = cached["metrics"], cached["log_probs"]
        else:
            self.dense_metrics = self.evaluate(self.dense)
            dense_cache(self.name, {"samples": self.samples},
                        {"metrics": self.dense_metrics, "log_probs": self.dense_log_probs})
        self.forward_seconds = dense_forward_seconds(self.dense, self.calibration(0, None), repeats=3)

    def _selection_batches(self, size=3000):
        train = self.task.train
        used = set()
        for seed in HELD_OUT_SEEDS:
            used.update(glue.calibration_indices(len(train), self.samples, seed, "distinct"))
        free = [i for i in range(len(train)) if i not in used]
        picks = [free[int(j * len(free) / size)] for j in range(size)]
        encoded = glue.encode([train[i] for i in picks], self.tokenizer, self.task.spec)
        return [accepted_inputs(self.dense, b) | {"labels": b["labels"]}
                for b in glue.batches(encoded, 128, self.tokenizer.pad_token_id)]

    @torch.no_grad()
    def _selection_log_probs(self, model):
        return torch.cat([torch.log_softmax(model(**{k: v for k, v in b.items() if k != "labels"}).logits.double(), -1)
                          for b in self.selection])

    def calibration(self, seed, nsamples):
        if seed not in self.calibrations:
            self.calibrations[seed] = self.task.calibration_batches(self.dense, self.samples, seed)
        return self.calibrations[seed]

    def calibration_tokens(self, seed, nsamples):
        return sum(int(b["attention_mask"].sum()) for b in self.calibration(seed, None))

    def search_settings(self, seed, nsamples, passes, start, examples):
        """--allocation search as prune_bert.py sets it: the KL on `examples` training sentences
        that the calibration sample does not draw, a budget of `passes` dense passes."""
        batches = self.task.search_batches(self.dense, examples or SEARCH_EXAMPLES, seed, self.samples)
        return SearchSettings(batches, passes * self.calibration_tokens(seed, None), seed, start)

    def evaluate(self, model):
        """dev accuracy; on the selection sentences accuracy and the mean KL divergence of the
        pruned model's class probabilities from the dense model's (a smoother criterion)."""
        dev = self.task.evaluate(model, "cpu")["accuracy"]
        log_probs = self._selection_log_probs(model)
        if self.dense_log_probs is None:
            self.dense_log_probs = log_probs
        labels = torch.cat([b["labels"] for b in self.selection])
        kl = (self.dense_log_probs.exp() * (self.dense_log_probs - log_probs)).sum(-1).mean()
        return {"dev": dev, "select": float((log_probs.argmax(-1) == labels).double().mean()), "select_kl": float(kl)}


# ---------------------------------------------------------------------------------------------
# SmolLM2 on Austen, and off domain


class SmolLM2:
    name = "smollm2"
    higher_is_better = False

    def __init__(self, args):
        from scripts.convert_smollm2 import DEFAULT_OUT, convert

        self.tokenizer, self.dense, self.adapter = load_dense(convert(DEFAULT_OUT))
        self.seqlen, self.nsamples, self.batch_size = args.seqlen, args.nsamples, args.batch_size
        self.costs = adapter_costs(self.adapter, self.seqlen)
        self.data_dir = self._write_text_task()
        tokens = lm.eval_tokens("austen", self.tokenizer)["prideprejudice"]
        self.windows = {
            "in_domain": lm.eval_windows(tokens, self.seqlen, args.eval_windows),
            "off_domain": lm.eval_windows(lm.eval_tokens("text", self.tokenizer, self.data_dir)["text"], self.seqlen,
                                          args.eval_windows),
            "select": self._selection_windows(),
        }
        self.windows = {name: w for name, w in self.windows.items() if name in args.sets}
        self.calibrations = {}
        key = {"sets": sorted(self.windows), "seqlen": self.seqlen, "nsamples": self.nsamples,
               "eval_windows": args.eval_windows}
        cached = dense_cache(self.name, key)
        self.dense_metrics = cached["metrics"] if cached else self.evaluate(self.dense)
        if not cached:
            dense_cache(self.name, key, {"metrics": self.dense_metrics})
        # measured in every run of this script, not kept: a time taken beside other work, or on another
        # session's machine (2.7x apart between two), would skew the dense passes of every later record
        self.forward_seconds = dense_forward_seconds(self.dense, self.calibration(0, None), repeats=1,
                                                     use_cache=False)

    def _write_text_task(self):
        """`--task text` data: train.txt = the Austen calibration text, test.txt = the
        movie-sentiment dev sentences, one per line."""
        data_dir = tempfile.mkdtemp(prefix="stat-offdomain-")
        with open(os.path.join(data_dir, "train.txt"), "w", encoding="utf-8") as f:
            f.write(lm.train_text("austen"))
        sentences = [example.text_a for example in glue.load_examples("movie-sentiment", "validation")]
        with open(os.path.join(data_dir, "test.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(sentences) + "\n")
        return data_dir

    def _selection_windows(self, count=24):
        """Windows of the calibration text that no calibration window of HELD_OUT_SEEDS touches."""
        ids = lm.tokenize(self.tokenizer, lm.train_text("austen"))[0]
        used = np.zeros(len(ids), dtype=bool)
        for seed in HELD_OUT_SEEDS:
            for start in self._starts(len(ids), seed, max(self.nsamples, 128)):
                used[start:start + self.seqlen] = True
        free = [s for s in range(0, len(ids) - self.seqlen, self.seqlen) if not used[s:s + self.seqlen].any()]
        picks = [free[int(j * len(free) / count)] for j in range(count)]
        return torch.stack([ids[s:s + self.seqlen] for s in picks])

    def _starts(self, n_tokens, seed, nsamples):
        import random  # the draws of lm.calibration_windows

        rng = random.Random(seed)
        return [rng.randint(0, n_tokens - self.seqlen - 1) for _ in range(nsamples)]

    def calibration(self, seed, nsamples):
        key = (seed, nsamples or self.nsamples)
        if key not in self.calibrations:
            windows = lm.calibration_windows("austen", self.tokenizer, key[1], self.seqlen, seed)
            self.calibrations[key] = lm.window_batches(windows, self.batch_size)
        return self.calibrations[key]

    def calibration_tokens(self, seed, nsamples):
        return (nsamples or self.nsamples) * self.seqlen

    def search_settings(self, seed, nsamples, passes, start, examples=None):
        """--allocation search as prune_opt.py sets it: the KL on the `examples` (SEARCH_WINDOWS) windows drawn
        after the calibration windows (one per batch), a budget of `passes` dense passes."""
        nsamples, examples = nsamples or self.nsamples, examples or SEARCH_WINDOWS
        windows = lm.calibration_windows("austen", self.tokenizer, nsamples + examples, self.seqlen,
                                         seed)[nsamples:]
        return SearchSettings(lm.window_batches(windows, 1), passes * nsamples * self.seqlen, seed, start)

    def evaluate(self, model):
        return {name: perplexity(model, self.adapter, w, "cpu", self.batch_size, progress=False)
                for name, w in self.windows.items()}


# ---------------------------------------------------------------------------------------------


def run(bench, variant, mu, seed):
    options, nsamples = parse_variant(variant)
    if "sketch" in options:  # its draws follow the calibration seed, as the scripts' --seed
        options["sketch"] = options["sketch"].reseeded(seed)
    examples = options.pop("search_examples", None)
    if "search" in options:
        start = options.get("allocation") or bench.adapter.default_allocation
        allocation, passes = options["search"]
        options.update(allocation=allocation, search=bench.search_settings(seed, nsamples, passes, start, examples))
    model = copy.deepcopy(bench.dense)
    result = stat_prune(model, bench.adapter, bench.calibration(seed, nsamples), bench.costs, mu, "cpu",
                        progress=False, **options)
    dense_macs = model_macs(*bench.adapter.shape(bench.dense), bench.costs)
    ratio = model_macs(result.attn_units, result.neurons, bench.costs) / dense_macs
    assert ratio <= mu + 1e-9, (variant, mu, ratio)
    record = {"variant": variant, "mu": mu, "seed": seed, "metrics": bench.evaluate(model),
              "dense": bench.dense_metrics, "mac_ratio": ratio, "prune_seconds": result.seconds,
              "forward_seconds": bench.forward_seconds, "attn_units": result.attn_units,
              "neurons": result.neurons}
    record.update(search_record(result, options.get("search"), bench.calibration_tokens(seed, nsamples)))
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"{bench.name}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
    searched = (f"; search KL {result.search.start_fitness:.4f} -> {result.search.fitness:.4f} "
                f"({result.search.generations} generations, {result.search.seconds:.0f} s)" if result.search else "")
    print(f"  mu {mu:.2f} {variant} seed {seed}: {metrics}; prune {result.seconds:.1f} s "
          f"({result.seconds / bench.forward_seconds:.2f} dense passes){searched}", flush=True)
    return record


def records_name(args):
    """The records' file name: minilm's `select` sentences avoid the calibration draws, so they
    differ with --samples, and records of other sizes go to a file of their own."""
    if args.model == "minilm" and args.samples != MINILM_SAMPLES:
        return f"minilm-{args.samples}"
    return args.model


def tables(name, variants, mus, seeds):
    """Mean over `seeds` of every metric, per μ and variant, from the records on file."""
    path = os.path.join(OUT, f"{name}.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    latest = {}
    for r in records:  # the latest run of each (variant, μ, seed), and the latest value of each metric
        key = r["variant"], r["mu"], r["seed"]
        metrics = {**latest[key]["metrics"], **r["metrics"]} if key in latest else r["metrics"]
        latest[key] = {**r, "metrics": metrics}
    if not latest:
        return
    dense = {}
    for r in latest.values():
        dense.update(r["dense"])
    width = max(12, *(len(v) for v in variants))
    for metric in dense:
        print(f"\n{metric} (dense {dense[metric]:.4f}), mean over seeds {list(seeds)} (n: runs found)")
        print(f"{'mu':>5}  " + "  ".join(f"{v:>{width}}" for v in variants))
        for mu in mus:
            cells = []
            for v in variants:
                values = [latest[v, mu, s]["metrics"][metric] for s in seeds
                          if (v, mu, s) in latest and metric in latest[v, mu, s]["metrics"]]
                if not values:
                    cells.append(f"{'-':>{width}}")
                    continue
                mean = statistics.mean(values)
                rel = mean / dense[metric] if name == "smollm2" else mean - dense[metric]
                text = f"{mean:.4f} ({rel:.3f}x)" if name == "smollm2" else f"{mean:.4f} ({100 * rel:+.2f})"
                cells.append(f"{text + ('' if len(values) == len(seeds) else f' n{len(values)}'):>{width}}")
            print(f"{mu:>5.2f}  " + "  ".join(cells))
    print("\npruning time in dense forward passes over the calibration set, and in seconds (mean over every "
          "run found)")
    for v in variants:
        runs = [r for (name_, mu, s), r in latest.items() if name_ == v and mu in mus and s in seeds]
        if runs:
            ratio = statistics.mean(r["prune_seconds"] / r["forward_seconds"] for r in runs)
            print(f"  {v:>{width}}: {ratio:.2f} ({statistics.mean(r['prune_seconds'] for r in runs):.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["minilm", "smollm2"])
    p.add_argument("--mus", type=float, nargs="+")
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table", action="store_true", help="only print the tables from the records on file")
    p.add_argument("--samples", type=int, default=MINILM_SAMPLES, help="minilm: calibration examples")
    p.add_argument("--nsamples", type=int, default=32, help="smollm2: calibration windows")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--sets", nargs="+", default=["in_domain", "off_domain", "select"],
                   help="smollm2: the perplexities to measure (select alone while choosing)")
    args = p.parse_args()
    mus = args.mus or ([0.2, 0.3, 0.4, 0.5, 0.7] if args.model == "minilm" else [0.95, 0.9, 0.8, 0.7])
    torch.manual_seed(0)
    if not args.table:
        bench = (MiniLM if args.model == "minilm" else SmolLM2)(args)
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in bench.dense_metrics.items())
        print(f"{args.model}: dense {metrics}; one dense forward pass over the calibration set "
              f"{bench.forward_seconds:.1f} s", flush=True)
        for mu in mus:
            for variant in args.variants:
                for seed in args.seeds:
                    run(bench, variant, mu, seed)
    tables(records_name(args), args.variants, mus, args.seeds)


if __name__ == "__main__":
    main()
