"""--allocation search (prune/search.py): the level database, the fitness, the moves, the search,
and --widths / --save_widths through prune_opt.py."""
import copy
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import prune_bert
import prune_opt
import tiny
from prerequisites.adapters import adapter_for
from prerequisites.layerwise import capture_inputs
from prune.allocation import LayerScores, greedy
from prune.search import (Exchange, Fitness, LevelDatabase, SearchSettings, load_widths, measured_weights, mutate,
                          probe_width, save_widths, search, widths_problem)
from prune.stat import measure_dense, stat_prune
from tiny import one_thread  # noqa: F401 (a fixture)
from utils.cli import run_main
from utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n, length=24, seed=0):
    """Unpadded batches of one window each (the shape of a decoder's calibration windows)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 2000, (1, length), generator=g)} for _ in range(n)]


@pytest.fixture(scope="module")
def setting():
    """A tiny Llama (3 layers, 2 KV groups, 64 neurons), pass 1's solved pruners on 12 windows
    (288 rows), and 4 other windows to measure the KL on."""
    model = tiny.llama()
    adapter = adapter_for(model)
    calibration = windows(12)
    _, pruners = measure_dense(model, adapter, capture_inputs(model, adapter, calibration, "cpu"), "cpu",
                               keep=("attn", "ffn"), progress=False)
    return model, adapter, calibration, pruners, windows(4, seed=1)


def fitness_of(setting):
    model, adapter, _, pruners, held_out = setting
    return Fitness(model, adapter, LevelDatabase(model, adapter, pruners), held_out, "cpu")


def test_level_database_block_equals_the_id_taken_directly(setting):
    """Layer 1 at 20 of 64 neurons: the neurons of an independent pivoted QR of A·diag(‖W_j‖)
    (scipy, on the dense model's activations) and the least-squares correction of the rest."""
    model, adapter, calibration, pruners, _ = setting
    captured = []
    layer = adapter.layers(model)[1]
    handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for batch in calibration:
            model(**batch)
    handle.remove()
    A = torch.cat(captured).double().numpy()
    W = layer.mlp.down_proj.weight.detach().double().numpy()
    _, _, pivots = scipy.linalg.qr(A * np.linalg.norm(W, axis=0), pivoting=True)
    kept, dropped = pivots[:20], pivots[20:]
    T = np.linalg.lstsq(A[:, kept], A[:, dropped], rcond=None)[0]
    W_expected = W[:, kept] + W[:, dropped] @ T.T

    pruned = LevelDatabase(model, adapter, pruners).layer(1, 2, 20)
    assert adapter.n_neurons(pruned) == 20 and adapter.n_attn_units(pruned) == 2
    sort = np.argsort(kept)
    expected_rows = torch.tensor(np.sort(kept))
    assert torch.equal(pruned.mlp.up_proj.weight, layer.mlp.up_proj.weight[expected_rows])
    got = pruned.mlp.down_proj.weight.detach().double().numpy()
    assert np.allclose(got, W_expected[:, sort], rtol=1e-4, atol=1e-5 * np.abs(W_expected).max())
    assert adapter.n_neurons(layer) == 64  # the dense layer is left alone


def test_level_database_block_equals_the_block_pruned_directly(setting):
    """Every block at its width (heads too) is the block that one-shot pruning at those widths makes."""
    model, adapter, calibration, pruners, _ = setting
    db = LevelDatabase(model, adapter, pruners)
    attn_units, neurons = [2, 1, 2], [40, 64, 9]
    direct = copy.deepcopy(model)
    stat_prune(direct, adapter_for(direct), calibration, (100.0, 1.0), 1.0, "cpu", calibration="one_shot",
               widths=(attn_units, neurons), progress=False)
    for l, (a, n) in enumerate(zip(attn_units, neurons)):
        mine, theirs = db.layer(l, a, n).state_dict(), adapter.layers(direct)[l].state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-6), key


def test_mutation_moves_units_at_equal_macs():
    rng = np.random.default_rng(0)
    full = {"attn": [4, 4, 4, 4], "ffn": [64, 64, 64, 64]}
    attn_units, neurons = [4, 2, 0, 4], [10, 64, 3, 30]
    for _ in range(300):
        a, n, first = mutate(attn_units, neurons, full, {"attn": 1, "ffn": 8}, rng, moves=int(rng.integers(1, 4)))
        assert sum(a) == sum(attn_units) and sum(n) == sum(neurons)
        assert all(0 <= x <= f for x, f in zip(a + n, full["attn"] + full["ffn"]))
        changed = [l for l in range(4) if (a[l], n[l]) != (attn_units[l], neurons[l])]
        assert not changed or changed[0] >= first  # below the first layer named, nothing moved
        attn_units, neurons = a, n
    # a single layer, or every layer full: nothing can move
    assert mutate([2], [8], {"attn": [4], "ffn": [8]}, {"attn": 1, "ffn": 8}, rng, 1) is None
    assert mutate([4, 4], [8, 8], {"attn": [4, 4], "ffn": [8, 8]}, {"attn": 1, "ffn": 8}, rng, 1) is None


def test_trades_between_kinds_stay_within_the_start_macs():
    """With an Exchange, moves also trade an attention unit for neurons: the MACs never exceed the
    start's, and the slack a trade leaves (neurons come in multiples) is spent by later ones."""
    rng = np.random.default_rng(1)
    full = {"attn": [4, 4, 4, 4], "ffn": [64, 64, 64, 64]}
    attn_units, neurons = [4, 2, 1, 4], [10, 64, 3, 30]
    exchange = Exchange(attn_cost=10.0, neuron_cost=3.0, budget=11 * 10.0 + 107 * 3.0, multiple=2)
    assert (exchange.neurons_bought(0.0), exchange.neurons_paid(0.0)) == (2, 4)  # 10 MACs: 3 neurons, or 4
    assert (exchange.neurons_bought(2.0), exchange.neurons_paid(2.0)) == (4, 4)  # 12: 4; 8: 3, made 4
    traded = set()
    for _ in range(300):
        a, n, first = mutate(attn_units, neurons, full, {"attn": 1, "ffn": 8}, rng, moves=int(rng.integers(1, 4)),
                             exchange=exchange)
        macs = 10.0 * sum(a) + 3.0 * sum(n)
        assert macs <= exchange.budget + 1e-9 and exchange.budget - macs < 10.0 + 3.0 * 2  # not wasted either
        assert all(0 <= x <= f for x, f in zip(a + n, full["attn"] + full["ffn"]))
        changed = [l for l in range(4) if (a[l], n[l]) != (attn_units[l], neurons[l])]
        assert not changed or changed[0] >= first
        traded.add(np.sign(sum(a) - sum(attn_units)))
        attn_units, neurons = a, n
    assert traded >= {-1, 1}  # both ways
    # no neurons to pay for a unit, and none to give: nothing can move
    assert mutate([0], [8], {"attn": [1], "ffn": [8]}, {"attn": 1, "ffn": 8}, rng, 1,
                  exchange=Exchange(100.0, 1.0, 8.0)) is None


def test_fitness_against_an_independent_kl(setting):
    """The KL per token of a candidate, against the whole pruned model run by transformers (its
    layers swapped for the database's) and the KL written out in float64; from a later layer
    too, once a parent that shares the layers below is set."""
    model, adapter, _, pruners, held_out = setting
    fitness = fitness_of(setting)
    attn_units, neurons = [2, 1, 2], [64, 20, 33]
    pruned = copy.deepcopy(model)
    for l, (a, n) in enumerate(zip(attn_units, neurons)):
        pruned.model.layers[l] = copy.deepcopy(fitness.db.layer(l, a, n))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in held_out:
            log_p = F.log_softmax(model(**batch).logits.double(), dim=-1)
            log_q = F.log_softmax(pruned(**batch).logits.double(), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += batch["input_ids"].numel()
    expected = total / count
    got, states = fitness.score(attn_units, neurons, 0, len(held_out), keep=True)
    # Fitness sums Σ p log p and Σ p log q, each ~log(50,257) ≈ 11 nats a token, in float32: their
    # difference carries ~1e-6 nats of rounding (1.3e-4 of this KL on one machine's BLAS), bounded
    # here as for the dense model below
    assert got == pytest.approx(expected, abs=1e-5) and got > 0.001
    fitness.set_parent(states)
    assert abs(fitness.score(attn_units, [64, 20, 10], 2, len(held_out))[0] - expected) > 1e-4
    assert fitness.score(attn_units, neurons, 2, len(held_out))[0] == pytest.approx(got, rel=1e-9)
    # the dense model: Σ p log p − Σ p log q cancel to ~1e-7 of themselves
    assert fitness.score([2, 2, 2], [64, 64, 64], 0, 2)[0] == pytest.approx(0.0, abs=1e-5)


def test_search_never_worse_than_its_start_and_reproducible(setting):
    start = ([2, 2, 2], [20, 50, 30])
    results = [search(fitness_of(setting), *start, budget_tokens=2000, seed=3, progress=False) for _ in range(2)]
    found = results[0]
    assert (found.attn_units, found.neurons, found.fitness) == (results[1].attn_units, results[1].neurons,
                                                                 results[1].fitness)
    assert found.generations > 0 and found.layer_tokens >= 2000
    assert found.fitness <= found.start_fitness
    assert sum(found.neurons) == sum(start[1]) and found.attn_units == start[0]
    assert len(found.history) == found.generations and all(np.diff([found.start_fitness, *found.history]) <= 0)
    # its fitness is the KL of its widths, measured afresh
    fresh = fitness_of(setting)
    assert fresh.score(found.attn_units, found.neurons, 0, 4)[0] == pytest.approx(found.fitness, rel=1e-6)
    assert fresh.score(*start, 0, 4)[0] == pytest.approx(found.start_fitness, rel=1e-6)
    # with trades between the kinds (an attention unit the MACs of 40 neurons), from a start that
    # lacks a unit: still never worse, within the start's MACs, and the unit bought back
    start = ([2, 1, 2], [20, 50, 30])
    traded = search(fitness_of(setting), *start, budget_tokens=4000, seed=3, progress=False, costs=(40.0, 1.0))
    assert traded.fitness < traded.start_fitness
    assert sum(traded.attn_units) * 40 + sum(traded.neurons) <= sum(start[0]) * 40 + sum(start[1])
    assert sum(traded.attn_units) != sum(start[0])
    assert fresh.score(traded.attn_units, traded.neurons, 0, 4)[0] == pytest.approx(traded.fitness, rel=1e-6)


def test_measured_weights_give_each_block_its_own_kl(setting):
    """w² e(k)² is the KL of the dense model with that block alone pruned to the start's width k
    (run from layer 0 by a fresh Fitness, not from the dense states the measurement keeps); a
    block the start keeps whole, or keeps more of than the share of its kind kept overall, is
    measured at that share, or at the budget's share μ where that is smaller."""
    model, adapter, _, pruners, held_out = setting
    rng = np.random.default_rng(0)
    scores = [LayerScores(np.sort(rng.random(3))[::-1] * [1, 1, 0], np.ones(64), np.linspace(2, 0, 65))
              for _ in range(3)]
    start = ([1, 2, 2], [64, 20, 33])  # layer 0's FFN whole: measured at 117/192 of 64 = 39
    w_attn, w_neuron, record = measured_weights(fitness_of(setting), scores, *start, 0.9, progress=False)
    assert record["width"] == {"attn": [1, 1, 1], "neuron": [39, 20, 33]}
    capped = measured_weights(fitness_of(setting), scores, *start, 0.5, kinds=("neuron",), progress=False)[2]
    assert capped["width"] == {"neuron": [32, 20, 32]}  # at most half of each FFN kept
    fresh = fitness_of(setting)
    for kind, w in (("attn", w_attn), ("neuron", w_neuron)):
        for l in range(3):
            k = record["width"][kind][l]
            widths = [[2, 2, 2], [64, 64, 64]]
            widths[kind == "neuron"][l] = k
            kl = fresh.score(*widths, 0, len(held_out))[0]
            error = (scores[l].attn_errors if kind == "attn" else scores[l].neuron_errors)[k]
            assert kl > 0 and (w[l] * error) ** 2 == pytest.approx(kl, rel=1e-5, abs=1e-9)
            assert record["kl"][kind][l] == pytest.approx(kl, rel=1e-5, abs=1e-9)


def test_probe_width():
    assert probe_width(20, 64, 0.5) == 20 and probe_width(40, 64, 0.5) == 32
    assert probe_width(64, 64, 0.5) == 32 and probe_width(0, 64, 0.5) == 0
    assert probe_width(64, 64, 1.0) == 63 and probe_width(1, 1, 1.0) == 0  # at least one unit removed


def test_measured_allocation_end_to_end(setting):
    """stat_prune with allocation 'measured': within the budget, the start's knapsack with the
    measured weights, and the record of what was measured."""
    model, adapter, calibration, _, held_out = setting
    pruned = copy.deepcopy(model)
    settings = SearchSettings(held_out, 0.0, 0, "greedy")
    result = stat_prune(pruned, adapter_for(pruned), calibration, (100.0, 1.0), 0.6, "cpu", allocation="measured",
                        search=settings, calibration="one_shot", progress=False)
    assert result.allocation == "measured" and result.search is None
    assert sum(result.attn_units) * 100 + sum(result.neurons) <= 0.6 * (600 + 192) + 1e-9
    kl, width = result.measured["kl"], result.measured["width"]
    w_attn = [np.sqrt(x) / s.attn_errors[k] for x, k, s in zip(kl["attn"], width["attn"], result.scores)]
    w_neuron = [np.sqrt(x) / s.neuron_errors[k] for x, k, s in zip(kl["neuron"], width["neuron"], result.scores)]
    assert (result.attn_units, result.neurons) == tuple(greedy(result.scores, 100.0, 1.0, 0.6, (w_attn, w_neuron)))
    with pytest.raises(ValueError, match="knapsack"):
        stat_prune(copy.deepcopy(model), adapter, calibration, (100.0, 1.0), 0.6, "cpu", allocation="measured",
                   search=SearchSettings(held_out, 0.0, 0, "faithful"), progress=False)


def test_widths_files(tmp_path):
    path = str(tmp_path / "w.json")
    save_widths(path, [4, 3], [64, 10], mu=0.5)
    assert load_widths(path, ([4, 4], [64, 64]), (10, 1), 0.7) == ([4, 3], [64, 10])
    assert json.load(open(path))["mu"] == 0.5
    assert "more than mu 0.5" in widths_problem(([4, 3], [64, 10]), ([4, 4], [64, 64]), (10, 1), 0.5)
    assert "neurons_per_layer must be 2 integers" in widths_problem(([4, 3], [65, 10]), ([4, 4], [64, 64]),
                                                                     (10, 1), 1.0)
    assert "heads_per_layer" in widths_problem(([4], [6, 1]), ([4, 4], [64, 64]), (10, 1), 1.0)
    open(path, "w").write("{")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        load_widths(path, ([4, 4], [64, 64]), (10, 1), 1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.write_austen(tmp_path_factory.mktemp("text"), 40000, 12000)


def prune_argv(tiny_checkpoints, data, out, *more):
    return ["--model_name", "tiny-llama", "--model_dir", tiny_checkpoints["tiny-llama"], "--task", "text",
            "--data_dir", data, "--mu", "0.6", "--seed", "1", "--nsamples", "8", "--seqlen", "64",
            "--eval_samples", "2", "--output_dir", out, "--device", "cpu", *more]


def check_searched(record, start, held_out, budget_tokens, mu, results_txt, widths):
    """A script's record of --allocation search, its line in the results block, and the widths it saved."""
    s = record["search"]
    assert record["allocation"] == "search" and s["start"] == start and s["windows"] == held_out
    assert s["kl"] <= s["kl_start"] and s["layer_tokens"] >= budget_tokens and 0 < record["mac_ratio"] <= mu
    assert "search: KL to dense" in open(results_txt).read()
    saved = json.load(open(widths))
    assert (saved["heads_per_layer"], saved["neurons_per_layer"]) == (record["heads_per_layer"],
                                                                      record["neurons_per_layer"])


def test_search_end_to_end_and_widths_round_trip(tiny_checkpoints, data, tmp_path):
    """prune_opt.py --allocation search: the record of the search, the widths saved; pruning
    again to those widths with --widths gives the same model (the same perplexity)."""
    out, widths = str(tmp_path / "out"), str(tmp_path / "widths.json")
    searched = prune_opt.main(prune_argv(tiny_checkpoints, data, out, "--allocation", "search",
                                         "--search_tokens", "3000", "--search_windows", "4",
                                         "--save_widths", widths))
    check_searched(searched, "ffn_greedy", 4, 3000, 0.6, os.path.join(out, "opt", "tiny-llama.txt"), widths)
    s = searched["search"]
    assert s["dense_passes"] == pytest.approx(s["layer_tokens"] / (8 * 64))
    saved = json.load(open(widths))
    again = prune_opt.main(prune_argv(tiny_checkpoints, data, out, "--widths", widths))
    assert again["allocation"] == "widths" and "search" not in again
    assert (again["heads_per_layer"], again["neurons_per_layer"]) == (saved["heads_per_layer"],
                                                                      saved["neurons_per_layer"])
    assert again["ppl_pruned"]["text"] == pytest.approx(searched["ppl_pruned"]["text"], rel=1e-6)


def check_measured(record, start, held_out, blocks, mu, results_txt):
    """A script's record of --allocation measured and its line in the results block."""
    m = record["measured"]
    assert record["allocation"] == "measured" and m["start"] == start and m["windows"] == held_out
    assert "search" not in record and 0 < record["mac_ratio"] <= mu and m["dense_passes"] > 0
    assert sum(kl is not None and kl > 0 for kind in m["kl"].values() for kl in kind) == blocks
    assert "measured prices: the KL to dense" in open(results_txt).read()


def test_measured_end_to_end(tiny_checkpoints, data, tmp_path):
    """prune_opt.py --allocation measured: greedy's knapsack, not the decoders' ffn_greedy, so every
    attention block is measured too (and the heads priced against the neurons)."""
    out = str(tmp_path / "out")
    record = prune_opt.main(prune_argv(tiny_checkpoints, data, out, "--allocation", "measured",
                                       "--search_windows", "2"))
    check_measured(record, "greedy", 2, 6, 0.6, os.path.join(out, "opt", "tiny-llama.txt"))
    assert set(record["measured"]["kl"]) == {"attn", "neuron"}


@pytest.mark.parametrize("more,expected", [
    (["--search_tokens", "100"], "applies to --allocation search"),
    (["--allocation", "measured", "--search_tokens", "100"], "applies to --allocation search"),
    (["--allocation", "measured", "--protocol", "paper"], "not the paper protocol's faithful rule"),
    (["--allocation", "measured", "--low_memory"], "not with --low_memory"),
    (["--allocation", "search", "--method", "magnitude"], "--method stat only"),
    (["--allocation", "search", "--low_memory"], "not with --low_memory"),
    (["--widths", "/no/such/file"], "no such file"),
    (["--widths", "WIDTHS", "--allocation", "greedy"], "not with --allocation"),
    (["--widths", "WIDTHS"], "more than mu 0.6"),
    (["--widths", "SHORT"], "must be 3 integers"),
])
def test_bad_search_input(tiny_checkpoints, data, tmp_path, capsys, more, expected):
    save_widths(str(tmp_path / "WIDTHS"), [2, 2, 2], [64, 64, 64])
    save_widths(str(tmp_path / "SHORT"), [2, 2], [6, 6])
    more = [str(tmp_path / m) if m in ("WIDTHS", "SHORT") else m for m in more]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run_main(lambda: prune_opt.main(prune_argv(tiny_checkpoints, data, str(out), *more)))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not (out / "opt").exists()


# ---------------------------------------------------------------------------------------------
# Encoders: the KL of the class distributions, per example


def encoder_candidate(model):
    """An encoder's fitness on 4 padded held-out batches (pass 1 on 4 others), the widths of a
    candidate, and the dense model with its layers replaced by the candidate's."""
    adapter = adapter_for(model)
    calibration, held_out = tiny.random_batches(4, 8, 12, seed=0), tiny.random_batches(4, 6, 12, seed=1)
    _, pruners = measure_dense(model, adapter, capture_inputs(model, adapter, calibration, "cpu"), "cpu",
                               keep=("attn", "ffn"), progress=False)
    fitness = Fitness(model, adapter, LevelDatabase(model, adapter, pruners), held_out, "cpu")
    attn_units, neurons = [4, 1, 3], [64, 20, 9]
    pruned = copy.deepcopy(model)
    for l, (a, n) in enumerate(zip(attn_units, neurons)):
        adapter.layers(pruned)[l] = copy.deepcopy(fitness.db.layer(l, a, n))
    return held_out, fitness, (attn_units, neurons), pruned


@pytest.mark.parametrize("build", [tiny.bert, tiny.distilbert])
def test_encoder_fitness_against_an_independent_kl(build):
    """A classifier's candidate: the KL per example of its class distribution to the dense
    model's, against the whole pruned model run by transformers on padded batches."""
    model = tiny._spread(build(), scale=1.0).eval()
    held_out, fitness, (attn_units, neurons), pruned = encoder_candidate(model)
    assert any(not bool(b["attention_mask"].all()) for b in held_out)  # padding is left out, not counted
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in held_out:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            log_p = F.log_softmax(model(**inputs).logits.double(), dim=-1)
            log_q = F.log_softmax(pruned(**inputs).logits.double(), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0]
    assert fitness.score(attn_units, neurons, 0, 4)[0] == pytest.approx(total / count, rel=1e-4)
    assert total > 0
    assert fitness.score([4, 4, 4], [64, 64, 64], 0, 4)[0] == 0.0
    assert fitness.tokens == [int(b["attention_mask"].sum()) for b in held_out]


def bert_argv(tiny_checkpoints, data, out, *more):
    return ["--model_name", "tiny-bert", "--task_name", "movie-sentiment", "--model_dir", tiny_checkpoints["tiny-bert"],
            "--data_dir", data, "--mu", "0.5", "--seed", "2", "--sample_batch_size", "32", "--batch_size", "16",
            "--output_dir", out, "--device", "cpu", *more]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    return tiny.write_movie_sentiment(tmp_path_factory.mktemp("movie-sentiment"), 120, 24)


def test_encoder_search_end_to_end_and_widths_round_trip(tiny_checkpoints, sentiment, tmp_path):
    """prune_bert.py --allocation search: judged on training examples the calibration sample
    does not draw; the widths saved, and pruning to them again gives the same model."""
    out, widths = str(tmp_path / "out"), str(tmp_path / "widths.json")
    searched = prune_bert.main(bert_argv(tiny_checkpoints, sentiment, out, "--allocation", "search",
                                         "--search_tokens", "4000", "--search_examples", "40",
                                         "--save_widths", widths))
    check_searched(searched, "greedy", 40, 4000, 0.5, os.path.join(out, "tiny-bert", "movie-sentiment.txt"), widths)
    again = prune_bert.main(bert_argv(tiny_checkpoints, sentiment, out, "--widths", widths))
    assert again["allocation"] == "widths" and "search" not in again
    assert again["metrics"]["pruned"] == searched["metrics"]["pruned"]


def test_encoder_measured_end_to_end(tiny_checkpoints, sentiment, tmp_path):
    """prune_bert.py --allocation measured: greedy's heads and neurons, each block measured."""
    out = str(tmp_path / "out")
    record = prune_bert.main(bert_argv(tiny_checkpoints, sentiment, out, "--allocation", "measured",
                                       "--search_examples", "24"))
    check_measured(record, "greedy", 24, 6, 0.5, os.path.join(out, "tiny-bert", "movie-sentiment.txt"))


def test_encoder_search_data_is_held_out_of_the_calibration(sentiment):
    """The fitness examples are training examples that the calibration sample does not draw."""
    from evaluate.tasks import make_task
    from prerequisites.checkpoint import load_tokenizer

    model = tiny.bert()
    task = make_task("movie-sentiment", load_tokenizer(tiny.tokenizer_dir_for("tiny-bert")), sentiment, 16)
    key = lambda ids: tuple(int(t) for t in ids if t != task.tokenizer.pad_token_id)  # noqa: E731
    calibration = {key(item["input_ids"]) for item in task.calibration_sample(60, 0)}
    batches = task.search_batches(model, 40, 0, 60)
    held_out = [key(row) for b in batches for row in b["input_ids"]]
    assert len(batches) == 8 and len(held_out) == 40 and not calibration & set(held_out)
    with pytest.raises(UserError, match="besides the calibration sample"):
        task.search_batches(model, 61, 0, 60)


@pytest.mark.parametrize("more,expected", [
    (["--search_examples", "10"], "apply to --allocation search"),
    (["--allocation", "search", "--method", "magnitude"], "--method stat only"),
    (["--widths", "WIDTHS", "--method", "kwon"], "not kwon"),
    (["--widths", "WIDTHS"], "more than mu 0.5"),
])
def test_bad_encoder_search_input(tiny_checkpoints, sentiment, tmp_path, capsys, more, expected):
    save_widths(str(tmp_path / "WIDTHS"), [4, 4, 4], [64, 64, 64])
    more = [str(tmp_path / m) if m == "WIDTHS" else m for m in more]
    argv = bert_argv(tiny_checkpoints, sentiment, str(tmp_path / "out"), *more)
    if "kwon" in more:  # it draws its own sample
        at = argv.index("--sample_batch_size")
        argv = argv[:at] + argv[at + 2:]
    with pytest.raises(SystemExit) as info:
        run_main(lambda: prune_bert.main(argv))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out" / "tiny-bert").exists()


# ---------------------------------------------------------------------------------------------
# Encoders with a span head (SQuAD): the KL of the answer's (start, end) distribution, per example


@pytest.mark.parametrize("build", [tiny.bert, tiny.distilbert])
def test_span_fitness_against_an_independent_kl(build):
    """A QA candidate: per example, the KL of the start distribution plus that of the end
    distribution (the model's joint answer distribution), over the example's real tokens,
    against the whole models run by transformers; the same on the examples one to a batch
    (no padding), so the padding a batch adds changes nothing."""
    model = tiny._spread(build(qa=True), scale=1.0).eval()
    held_out, fitness, (attn_units, neurons), pruned = encoder_candidate(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in held_out:
            dense, mine = model(**batch), pruned(**batch)
            for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
                for which in ("start_logits", "end_logits"):
                    log_p = F.log_softmax(getattr(dense, which)[row, :length].double(), dim=0)
                    log_q = F.log_softmax(getattr(mine, which)[row, :length].double(), dim=0)
                    total += float((log_p.exp() * (log_p - log_q)).sum())
                count += 1
    kl = fitness.score(attn_units, neurons, 0, 4)[0]
    assert kl == pytest.approx(total / count, rel=1e-4) and total > 0
    assert fitness.score([4, 4, 4], [64, 64, 64], 0, 4)[0] == 0.0
    alone = [{k: v[row:row + 1, :int(b["attention_mask"][row].sum())] for k, v in b.items()}
             for b in held_out for row in range(len(b["input_ids"]))]
    one_each = Fitness(model, fitness.adapter, fitness.db, alone, "cpu")
    assert one_each.score(attn_units, neurons, 0, len(alone))[0] == pytest.approx(kl, rel=1e-4)


@pytest.fixture(scope="module")
def squad_data(tmp_path_factory):
    from test_squad_cli import write_squad
    folder = str(tmp_path_factory.mktemp("squad"))
    write_squad(folder, "1.1", more_train=10)  # 11 + 40 training questions, one feature each
    return folder


@pytest.mark.parametrize("sampler", ["distinct", "with_replacement"])
def test_squad_search_data_is_held_out_of_the_calibration(squad_data, sampler):
    """The fitness features come from training examples that the calibration sample draws no
    feature of; seeded; a clear error when there are not enough of them."""
    from dataset.squad import load_squad, prepare_train_features
    from evaluate.tasks import make_task
    from prerequisites.checkpoint import load_tokenizer

    model = tiny.bert(qa=True)
    task = make_task("squad", load_tokenizer(tiny.tokenizer_dir_for("tiny-bert-qa")), squad_data, 8)
    every = prepare_train_features(load_squad("1.1", "train", squad_data), task.tokenizer)
    owner = {tuple(f["input_ids"]): f["example_index"] for f in every}  # one feature per example here
    calibration = task.calibration_sample(20, 0, sampler)
    assert all(owner[tuple(f["input_ids"])] == f["example_index"] for f in calibration)
    used = {f["example_index"] for f in calibration}
    batches = task.search_batches(model, 24, 0, 20, sampler)
    held_out = [owner[tuple(int(t) for t, m in zip(ids, mask) if m)] for b in batches
                for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert len(batches) == 8 and len(held_out) == 24 == len(set(held_out)) and not used & set(held_out)
    again = task.search_batches(model, 24, 0, 20, sampler)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    with pytest.raises(UserError, match="besides the calibration sample"):
        task.search_batches(model, len(every) - len(used) + 1, 0, 20, sampler)


@pytest.mark.parametrize("allocation", ["search", "measured"])
def test_squad_search_end_to_end(tiny_checkpoints, squad_data, tmp_path, allocation):
    """prune_bert.py --task_name squad --allocation search / measured, judged on the answer spans."""
    out = str(tmp_path / "out")
    more = ["--search_tokens", "3000"] if allocation == "search" else []
    record = prune_bert.main(["--model_name", "tiny-bert-qa", "--task_name", "squad", "--mu", "0.5", "--seed", "1",
                              "--sample_batch_size", "16", "--batch_size", "4", "--model_dir",
                              tiny_checkpoints["tiny-bert-qa"], "--data_dir", squad_data, "--output_dir", out,
                              "--device", "cpu", "--allocation", allocation, "--search_examples", "16", *more])
    results_txt = os.path.join(out, "tiny-bert-qa", "squad.txt")
    if allocation == "search":
        s = record["search"]
        assert record["allocation"] == "search" and s["start"] == "greedy" and s["windows"] == 16
        assert s["kl"] <= s["kl_start"] and s["layer_tokens"] >= 3000 and 0 < record["mac_ratio"] <= 0.5
        assert "search: KL to dense" in open(results_txt).read()
    else:
        check_measured(record, "greedy", 16, 6, 0.5, results_txt)
