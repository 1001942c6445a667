"""MAC accounting and the allocation of the budget across layers."""
import numpy as np
import pytest

from efficiency.macs import Costs, model_macs, unit_costs
from prune.allocation import ALLOCATORS, LayerScores, _concave_segments, depth_weights


def test_unit_costs_by_hand():
    # BERT-base on MNLI: S = 39.05, d = 768, d_h = 64
    costs = unit_costs(768, 64, 39.05)
    assert costs.attn_unit == pytest.approx(4 * 39.05 * 768 * 64 + 2 * 39.05 ** 2 * 64)
    assert costs.neuron == pytest.approx(2 * 39.05 * 768)
    # a KV group of 3 query heads (SmolLM2: d = 576, d_h = 64) with a gated FFN, S = 2048
    gqa = unit_costs(576, 64, 2048, query_heads_per_unit=3, gated=True)
    per_query = 2 * 2048 * 576 * 64 + 2 * 2048 ** 2 * 64  # Q and O projections, scores, weighted sum
    assert gqa.attn_unit == pytest.approx(3 * per_query + 2 * 2048 * 576 * 64)  # + one K and one V head
    assert gqa.neuron == pytest.approx(3 * 2048 * 576)


def test_model_macs_of_a_pruned_shape_by_hand():
    costs = unit_costs(32, 8, 10)  # head: 4*10*32*8 + 2*100*8 = 11840; neuron: 2*10*32 = 640
    assert costs.attn_unit == 11840 and costs.neuron == 640
    assert model_macs([1, 2, 0], [10, 20, 0], costs) == 3 * 11840 + 30 * 640


def random_scores(L=4, H=6, N=40, seed=0):
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(L):
        head_errors = np.sort(rng.uniform(0, 10, H + 1))[::-1].copy()
        head_errors[-1] = 0.0
        pivots = np.sort(rng.exponential(1.0, N))[::-1].copy()
        errors = np.sqrt(np.concatenate([np.cumsum((pivots ** 2)[::-1])[::-1], [0.0]]))
        scores.append(LayerScores(head_errors, pivots, errors))
    return scores


@pytest.mark.parametrize("name", list(ALLOCATORS))
@pytest.mark.parametrize("mu", [0.05, 0.3, 0.5, 0.77, 0.95])
def test_allocations_stay_within_budget_and_use_it(name, mu):
    scores = random_scores()
    costs = Costs(attn_unit=30.0, neuron=2.0)
    dense = model_macs([6] * 4, [40] * 4, costs)
    heads, neurons = ALLOCATORS[name](scores, *costs, mu, "sqrt")
    used = model_macs(heads, neurons, costs)
    assert used <= mu * dense + 1e-9
    assert all(0 <= h <= 6 for h in heads) and all(0 <= n <= 40 for n in neurons)
    # nothing that fits is left on the table: one more neuron would exceed the budget,
    # unless every neuron is already kept
    assert used + costs.neuron > mu * dense or sum(neurons) == 160


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_mu_one_keeps_everything(name):
    heads, neurons = ALLOCATORS[name](random_scores(), *Costs(30.0, 2.0), 1.0, "sqrt")
    assert heads == [6] * 4 and neurons == [40] * 4


def test_uniform_by_hand():
    scores = random_scores(L=2, H=4, N=10)
    # budget: 0.5 * (8*30 + 20*2) = 140; heads floor(0.5*4)=2 per layer -> 120; left 20 -> 5 neurons per layer
    assert ALLOCATORS["uniform"](scores, *Costs(30.0, 2.0), 0.5) == ([2, 2], [5, 5])


def test_faithful_drops_heads_that_carry_no_error_first():
    scores = random_scores(L=2, H=4, N=10)
    scores[0].attn_errors = np.array([5.0, 0.0, 0.0, 0.0, 0.0])  # layer 0: one head does everything
    scores[1].attn_errors = np.array([9.0, 7.0, 5.0, 3.0, 0.0])
    heads, _ = ALLOCATORS["faithful"](scores, *Costs(30.0, 2.0), 0.6, "none")
    assert heads[0] <= 1 and heads[1] >= heads[0]


def test_greedy_prefers_the_largest_error_removed_per_mac():
    flat = np.zeros(11)
    two = LayerScores(np.array([10.0, 0.0]), np.ones(10), np.sqrt(np.arange(10, -1, -1.0)))  # one head removes 100
    one = LayerScores(np.array([1.0, 0.0]), np.ones(10), flat.copy())  # neurons remove nothing here
    heads, neurons = ALLOCATORS["greedy"]([two, one], *Costs(attn_unit=10.0, neuron=1.0), 0.5, "none")
    # budget 0.5 * (20 + 20) = 20: head of layer 0 (100 per 10 MACs = 10/MAC), then layer 0's neurons
    # (1 per MAC each) fill the remaining 10 MACs; layer 1 gets nothing
    assert heads == [1, 0] and neurons == [10, 0]


def test_concave_segments_by_hand():
    # cumulative gains 0, 1, 5, 6, 6: hull 0 -> 2 (2 units, gain 5) -> 3 (1, 1) -> 4 (1, 0)
    assert _concave_segments(np.array([0, 1, 5, 6, 6.0])) == [(2, 5.0), (1, 1.0), (1, 0.0)]


def test_depth_weights():
    scores = random_scores(L=4)
    w, _ = depth_weights(scores, "sqrt")
    assert np.allclose(w, np.sqrt([4, 3, 2, 1]) + 1)
    for s, size in zip(scores, [1.0, 2.0, 4.0, 8.0]):  # errors that double with depth
        s.attn_errors = s.attn_errors / s.attn_errors[0] * size
    w_head, _ = depth_weights(scores, "expfit")
    assert np.allclose(w_head * np.array([1.0, 2.0, 4.0, 8.0]), 1.0)


def test_ffn_greedy_keeps_every_head_while_it_can():
    scores = random_scores()
    costs = Costs(attn_unit=30.0, neuron=2.0)
    heads, neurons = ALLOCATORS["ffn_greedy"](scores, *costs, 0.7, "none")
    assert heads == [6] * 4
    dense = model_macs([6] * 4, [40] * 4, costs)
    assert model_macs(heads, neurons, costs) <= 0.7 * dense < model_macs(heads, neurons, costs) + costs.neuron
    # a layer whose neurons carry 100 times the error keeps all of them before the other keeps any
    loud, quiet = scores[0], scores[1]
    quiet.neuron_errors = loud.neuron_errors / 100
    heads, neurons = ALLOCATORS["ffn_greedy"]([loud, quiet], *costs, 0.8, "none")
    # budget 0.8 * (12*30 + 80*2) = 416: heads 360, then 28 neurons, all in the loud layer
    assert heads == [6, 6] and neurons == [28, 0]
    # below the MACs of the heads alone, it is greedy
    assert ALLOCATORS["ffn_greedy"](scores, *costs, 0.2, "none") == ALLOCATORS["greedy"](scores, *costs, 0.2, "none")
