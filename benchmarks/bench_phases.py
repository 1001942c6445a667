"""Where pruning's time goes: each phase of one run of a default, in seconds and in dense
forward passes over the same calibration tokens, measured in the same process.

    python benchmarks/bench_phases.py minilm  [--mu 0.5] [--pricing P ...] [--factor ...] [--sketch ... --sketch_rows N]
    python benchmarks/bench_phases.py smollm2 [--mu 0.8] [--pricing P ...] [--factor ...] [--sketch ... --sketch_rows N]

minilm: the demo classifier (MiniLM fine-tuned on movie-sentiment), 512 calibration examples,
prune_bert.py's improved protocol. smollm2: SmolLM2-135M on austen, 32 windows of 512 tokens,
prune_opt.py's improved protocol. Flags given override the protocol's knobs.

Times are the process's CPU seconds (all its threads), so that other work on a shared machine
does not inflate them; the prune time in wall seconds is printed too.
Phases (exclusive: a phase inside another counts once, for the inner one): capturing the
first layer's inputs; the layers' forward pieces (adapter calls); Gram accumulation
(Gram.add_batch, the sketch included); factorisations (pivoted and ordered Cholesky);
held-out pricing (the folds' products and solves, their factorisations counted as
factorisations); corrections (UnitPruner.prune, its solves); allocation; the rest (moving
layers, bookkeeping). Also pass 1 and pass 2 as wholes, and the evaluation of the pruned model.
"""
import argparse
import copy
import functools
import os
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prune.stat as stat  # noqa: E402
import prune.units as units  # noqa: E402
from efficiency.latency import forward_seconds  # noqa: E402
from efficiency.macs import adapter_costs  # noqa: E402
from pipelines import protocol  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from prune.gram import SKETCHES, Gram, Sketch  # noqa: E402

ADAPTER_PIECES = ("attention_context", "after_attention", "ffn_hidden", "after_ffn")


class PhaseClock:
    """Exclusive seconds per phase of wrapped callables (a call inside another phase's call is
    taken out of the outer one), and inclusive seconds of the two passes."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.stack = []

    def wrap(self, owner, name, phase, inclusive=False):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if inclusive:
                start = time.process_time()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds[phase] += time.process_time() - start
            self.stack.append(0.0)  # time spent in phases nested inside this call
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                inner = self.stack.pop()
                self.seconds[phase] += spent - inner
                if self.stack:
                    self.stack[-1] += spent

        setattr(owner, name, timed)


def instrument(clock):
    """Wrap the pruning's functions once (a second wrapping would count twice)."""
    clock.wrap(stat, "capture_inputs", "capturing inputs")
    clock.wrap(Gram, "add_batch", "Gram accumulation")
    clock.wrap(units, "pivoted_factor", "factorisations")
    clock.wrap(units, "ordered_factor", "factorisations")
    clock.wrap(units.UnitPruner, "_cross_validated_prices", "held-out pricing")
    clock.wrap(units.UnitPruner, "prune", "corrections")
    stat.ALLOCATORS = {name: _timed_allocator(clock, fn) for name, fn in stat.ALLOCATORS.items()}
    clock.wrap(stat, "measure_dense", "pass 1 (whole)", inclusive=True)
    clock.wrap(stat, "prune_sequential", "pass 2 (whole)", inclusive=True)


def _timed_allocator(clock, allocator):
    holder = type("Holder", (), {"run": staticmethod(allocator)})
    clock.wrap(holder, "run", "allocation")
    return holder.run


def minilm(args):
    from evaluate.tasks import make_task
    from scripts.build_demo_classifier import DEFAULT_OUT, build_classifier

    path = build_classifier(DEFAULT_OUT)
    model = load_model(path)
    task = make_task("movie-sentiment", load_tokenizer(path))
    knobs = protocol.resolve(argparse.Namespace(protocol="improved"), protocol.ENCODER)
    batches = task.calibration_batches(model, 512, args.seed)
    costs = adapter_costs(adapter_for(model), task.mac_seq_len)
    return model, batches, costs, knobs, lambda m: task.evaluate(m, "cpu")["accuracy"]


def smollm2(args):
    from dataset import lm
    from evaluate.perplexity import perplexity
    from scripts.convert_smollm2 import DEFAULT_OUT, convert

    path = convert(DEFAULT_OUT)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    knobs = protocol.resolve(argparse.Namespace(protocol="improved"), protocol.DECODER)
    batches = lm.window_batches(lm.calibration_windows("austen", tokenizer, 32, 512, args.seed), 4)
    windows = lm.eval_windows(lm.eval_tokens("austen", tokenizer)["prideprejudice"], 512, 40)
    costs = adapter_costs(adapter_for(model), 512)
    return model, batches, costs, knobs, lambda m: perplexity(m, adapter_for(m), windows, "cpu", 4, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["minilm", "smollm2"])
    p.add_argument("--mu", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pricing", nargs="+", choices=stat.PRICINGS,
                   help="one or more, each a run of its own in this process (their pass 1 times compared)")
    p.add_argument("--score_fraction", type=float)
    p.add_argument("--factor", choices=stat.FACTORS, default="auto")
    p.add_argument("--sketch", choices=SKETCHES, help="gaussian (rows per window) or count (rows per batch)")
    p.add_argument("--sketch_rows", type=int)
    args = p.parse_args()
    torch.manual_seed(0)
    dense, batches, costs, knobs, evaluate = (minilm if args.model == "minilm" else smollm2)(args)
    mu = args.mu or (0.5 if args.model == "minilm" else 0.8)
    use_cache = {"use_cache": False} if args.model == "smollm2" else {}
    start = time.process_time()
    wall_pass = forward_seconds(dense, batches, repeats=2, **use_cache)
    dense_pass = (time.process_time() - start) / 2  # the mean of two: one pass alone varied by 10 %
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    print(f"{args.model}: mu {mu}, {len(batches)} calibration batches ({tokens} tokens), allocation "
          f"{knobs['allocation']}, calibration {knobs['calibration']}, factor {args.factor}, sketch {args.sketch} "
          f"{args.sketch_rows}; one dense forward pass over them {dense_pass:.2f} CPU s, the mean of two "
          f"({wall_pass:.2f} s, the faster)", flush=True)
    clock = PhaseClock()
    instrument(clock)
    pass_1 = {}
    for pricing in args.pricing or [knobs["pricing"]]:
        pass_1[pricing] = run(args, dense, batches, costs, knobs, evaluate, mu, pricing, dense_pass, clock)
    names = list(pass_1)  # the issue's measure: pass 1's time with one pricing against another's
    for i, earlier in enumerate(names):
        for later in names[i + 1:]:
            print(f"\npass 1 with {later} prices / with {earlier} prices: {pass_1[later]:.2f} / "
                  f"{pass_1[earlier]:.2f} CPU s = {pass_1[later] / pass_1[earlier]:.2f}x")


def run(args, dense, batches, costs, knobs, evaluate, mu, pricing, dense_pass, clock):
    """One pruning of a copy of `dense` with its phases timed and printed; returns pass 1's CPU seconds."""
    score_fraction = args.score_fraction or (1.0 if pricing == "heldout" else knobs["score_fraction"])
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    for piece in ADAPTER_PIECES:
        clock.wrap(adapter, piece, "layer forwards")
    clock.seconds.clear()
    start = time.process_time()
    result = stat.stat_prune(model, adapter, batches, costs, mu, "cpu", allocation=knobs["allocation"],
                             calibration=knobs["calibration"], score_fraction=score_fraction, pricing=pricing,
                             factor=args.factor, progress=False,
                             sketch=Sketch(args.sketch, args.sketch_rows, args.seed) if args.sketch else None)
    prune_cpu = time.process_time() - start
    start = time.process_time()
    metric = evaluate(model)
    evaluation = time.process_time() - start
    phases = ["capturing inputs", "layer forwards", "Gram accumulation", "factorisations", "held-out pricing",
              "corrections", "allocation"]
    accounted = sum(clock.seconds[ph] for ph in phases)
    print(f"\npricing {pricing}, score_fraction {score_fraction}: prune time {prune_cpu:.1f} CPU s "
          f"({result.seconds:.1f} s) = {prune_cpu / dense_pass:.2f} dense passes (factor {result.factor}); "
          f"pruned metric {metric:.4f}")
    print(f"{'phase':>20}  {'CPU s':>8}  {'share':>6}  {'dense passes':>12}")
    for phase in phases + ["the rest"]:
        seconds = clock.seconds[phase] if phase != "the rest" else prune_cpu - accounted
        print(f"{phase:>20}  {seconds:>8.2f}  {seconds / prune_cpu:>6.1%}  {seconds / dense_pass:>12.2f}")
    for whole in ("pass 1 (whole)", "pass 2 (whole)"):
        print(f"{whole:>20}  {clock.seconds[whole]:>8.2f}  {clock.seconds[whole] / prune_cpu:>6.1%}  "
              f"{clock.seconds[whole] / dense_pass:>12.2f}")
    print(f"{'evaluation':>20}  {evaluation:>8.2f}  {'':>6}  {evaluation / dense_pass:>12.2f}", flush=True)
    return clock.seconds["pass 1 (whole)"]


if __name__ == "__main__":
    main()
