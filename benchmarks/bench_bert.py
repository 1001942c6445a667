"""Benchmark STAT on the real demo classifier (MiniLM fine-tuned on movie-sentiment).

    python benchmarks/bench_bert.py [--mus 0.3 0.4 0.5 0.6 0.7 0.8] [--variants ...]

Prints, next to the dense accuracy, the accuracy of every variant (method / allocation /
calibration; `kwon/-/-` is Kwon et al. 2022 on its own labelled sample of --num_samples) at
each μ, mean ± std (population) over the calibration seeds; the pruning wall time over the
time of one dense forward pass over the (--samples) calibration set (target ≤ 3); peak memory; and
the pruned/dense latency ratio at μ = 0.5 (target ≤ 0.65). All ratios come from this one run.

A variant may also be a protocol's name (`improved`, `paper`): every knob as `prune_bert.py
--protocol <name>` sets it (pipelines/protocol.py), its calibration draw and MAC split
included. The paper column of docs/protocols.md: --variants stat/greedy/sequential paper --seeds 0 1 2.
"""
import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficiency.latency import forward_seconds as dense_forward_seconds, measure_latency, peak_memory_mb  # noqa: E402
from efficiency.macs import AUTHORS_NEURON_SHARE, mac_ratios, unit_prices  # noqa: E402
from evaluate.tasks import make_task  # noqa: E402
from pipelines import protocol  # noqa: E402
from prerequisites.adapters import adapter_for  # noqa: E402
from prerequisites.checkpoint import load_model, load_tokenizer  # noqa: E402
from prune.kwon import kwon_prune  # noqa: E402
from prune.stat import stat_prune  # noqa: E402
from scripts.build_demo_classifier import DEFAULT_OUT, build_classifier  # noqa: E402

# method/allocation/calibration[/share of the calibration set scored in pass 1, default stat_prune's];
# the first is prune_bert.py's default
VARIANTS = [
    "stat/greedy/sequential",
    "paper",
    "stat/faithful/sequential",
    "stat/uniform/sequential",
    "stat/greedy/one_shot",
    "magnitude/greedy/-",
    "kwon/-/-",
]


def protocol_settings(name):
    """The knobs `prune_bert.py --protocol <name>` runs with."""
    return protocol.resolve(argparse.Namespace(protocol=name), protocol.ENCODER)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mus", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    p.add_argument("--variants", nargs="+", default=VARIANTS,
                   help="method/allocation/calibration[/score_fraction], or a protocol: improved, paper")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (accuracy is averaged)")
    p.add_argument("--num_samples", type=int, default=2048, help="kwon's labelled sample (theirs: 2048)")
    args = p.parse_args()
    torch.manual_seed(0)

    model_dir = build_classifier(DEFAULT_OUT)
    tokenizer = load_tokenizer(model_dir)
    task = make_task("movie-sentiment", tokenizer)
    dense_model = load_model(model_dir)
    adapter = adapter_for(dense_model)
    calibrations = {("distinct", seed): task.calibration_batches(dense_model, args.samples, seed)
                    for seed in args.seeds}
    calibration = calibrations["distinct", args.seeds[0]]
    prices = unit_prices(adapter, adapter.shape(dense_model), task.mac_seq_len, "encoder")
    labelled = {seed: task.labelled_batches(dense_model, task.labelled_sample(args.num_samples, seed))
                for seed in args.seeds if any(v.startswith("kwon") for v in args.variants)}

    def calibration_set(sampler, seed):
        if (sampler, seed) not in calibrations:
            calibrations[sampler, seed] = task.calibration_batches(dense_model, args.samples, seed, sampler)
        return calibrations[sampler, seed]

    dense_accuracy = task.evaluate(dense_model, "cpu")["accuracy"]
    forward_seconds = dense_forward_seconds(dense_model, calibration, repeats=3)
    latency_batch = task.latency_batch(dense_model)
    dense_latency = measure_latency(dense_model, latency_batch, "cpu")

    print(f"dense accuracy {dense_accuracy:.4f}; {args.samples} calibration examples, "
          f"one dense forward pass over them {forward_seconds:.2f} s")
    width = max([len(v) for v in args.variants] + [15])  # 15: "0.8000 ± 0.0000"
    table, timings, latency = [f"{'mu':>5}  " + "  ".join(f"{v:>{width}}" for v in args.variants)], {}, {}
    for mu in args.mus:
        row = f"{mu:>5.2f}  "
        for name in args.variants:
            if name in protocol.PROTOCOLS:
                knobs = protocol_settings(name)
                method, allocation, calibration_mode = "stat", knobs["allocation"], knobs["calibration"]
                sampler, split = knobs["sampler"], knobs["mac_split"]
                scoring = {"score_fraction": knobs["score_fraction"], "pricing": knobs["pricing"]}
            else:
                method, allocation, calibration_mode, *scored = name.split("/")
                sampler, split = "distinct", "exact"
                scoring = {"score_fraction": float(scored[0])} if scored else {}  # else stat_prune's default
            share = AUTHORS_NEURON_SHARE["encoder"] if split == "authors" else None
            accuracies = []
            for seed in args.seeds:
                model = copy.deepcopy(dense_model)
                if method == "kwon":
                    result = kwon_prune(model, adapter, labelled[seed], prices[split], mu, "cpu", classification=True,
                                        progress=False)
                else:
                    result = stat_prune(model, adapter, calibration_set(sampler, seed), prices[split], mu, "cpu",
                                        method=method, allocation=allocation,
                                        calibration=calibration_mode if method == "stat" else "sequential",
                                        neuron_share=share, progress=False, **scoring)
                accuracies.append(task.evaluate(model, "cpu")["accuracy"])
                exact, authors = mac_ratios(prices, adapter.shape(dense_model), (result.attn_units, result.neurons))
                ratio = exact if split == "exact" else authors
                assert ratio <= mu + 1e-9, (name, mu, ratio)
                timings.setdefault(name, []).append(result.seconds)
                if abs(mu - 0.5) < 1e-9 and seed == args.seeds[0]:
                    latency[name] = measure_latency(model, latency_batch, "cpu") / dense_latency
                print(f"  mu {mu:.2f} {name:>{width}} seed {seed}: accuracy {accuracies[-1]:.4f} "
                      f"(dense {dense_accuracy:.4f}), MACs {exact:.4f} (authors' split {authors:.4f}), "
                      f"heads {result.attn_units}, prune {result.seconds:.1f} s", flush=True)
            row += f"  {f'{np.mean(accuracies):.4f} ± {np.std(accuracies):.4f}':>{width}}"
        table.append(row)

    print(f"\naccuracy on movie-sentiment dev (dense {dense_accuracy:.4f}), mean over calibration seeds {args.seeds}")
    print("\n".join(table))
    print("\npruning wall time / one dense forward pass over the calibration set (target <= 3):")
    for name, seconds in timings.items():
        print(f"  {name:>{width}}: {sum(seconds) / len(seconds) / forward_seconds:.2f}")
    if latency:
        print("pruned/dense latency at mu = 0.5 (batch of 32, target <= 0.65):")
        for name, ratio in latency.items():
            print(f"  {name:>{width}}: {ratio:.2f}")
    print(f"peak memory (max RSS of this process): {peak_memory_mb('cpu'):.0f} MB")


if __name__ == "__main__":
    main()
