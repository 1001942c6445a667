"""MAC accounting and the allocation of the budget across layers; the authors' rule (golden
tests against transcriptions of their scripts, in plain numpy)."""
import numpy as np
import pytest
import scipy.linalg

from efficiency.macs import AUTHORS_NEURON_SHARE, Costs, mac_ratios, model_macs, split_costs, unit_costs
from prune.allocation import (ALLOCATORS, LayerScores, _concave_segments, authors_depth_weights, depth_weights,
                              faithful, round_neurons)


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
    # unless every neuron is already kept (the authors' rule floors a count per layer: one more
    # neuron in every layer would exceed it)
    slack = 4 * costs.neuron if name == "faithful" else costs.neuron
    assert used + slack > mu * dense or sum(neurons) == 160


@pytest.mark.parametrize("name", list(ALLOCATORS))
@pytest.mark.parametrize("mu", [0.3, 0.77, 1.0])
@pytest.mark.parametrize("multiple", [8, 32, 64])
def test_rounded_widths_are_multiples_within_the_budget(name, mu, multiple):
    """Every count a multiple (or the layer's whole width of 40), the budget kept, and nothing
    that fits left: one more block in any layer would exceed it."""
    scores = random_scores()
    costs = Costs(attn_unit=30.0, neuron=2.0)
    dense = model_macs([6] * 4, [40] * 4, costs)
    heads, neurons = ALLOCATORS[name](scores, *costs, mu, "sqrt")
    rounded = round_neurons(scores, heads, neurons, *costs, mu, multiple, "sqrt")
    assert all(n % multiple == 0 or n == 40 for n in rounded)
    used = model_macs(heads, rounded, costs)
    assert used <= mu * dense + 1e-9
    for n in rounded:
        step = min(multiple, 40 - n)
        assert step == 0 or used + step * costs.neuron > mu * dense + 1e-9


def test_rounding_gives_blocks_to_the_largest_error_removed_by_hand():
    """Two layers of 4 neurons, blocks of 2, budget 6 of 8 neurons, no weighting. Plain counts
    (3, 3) round down to (2, 2); the 2 freed neurons go where the block from 2 to 4 neurons
    removes more squared error: layer 1 (2^2 - 0^2 = 4) rather than layer 0 (1^2 - 0^2 = 1)."""
    pivots = np.ones(4)
    layer0 = LayerScores(np.array([0.0]), pivots, np.array([3.0, 2.0, 1.0, 0.5, 0.0]))
    layer1 = LayerScores(np.array([0.0]), pivots, np.array([3.0, 2.5, 2.0, 1.0, 0.0]))
    assert round_neurons([layer0, layer1], [0, 0], [3, 3], 0.0, 1.0, 0.75, 2, "none") == [2, 4]
    assert round_neurons([layer0, layer1], [0, 0], [3, 3], 0.0, 1.0, 0.75, 1, "none") == [3, 3]


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
    w, _ = depth_weights(scores, "sqrt")  # the authors': sqrt(L - l + 1) + 1, l = 0..L-1
    assert np.allclose(w, np.sqrt([5, 4, 3, 2]) + 1)
    w, _ = depth_weights(scores, "sqrt_remaining")  # the improved protocol's greedy: sqrt(L - l) + 1
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


def test_authors_depth_weights_on_bert_base_by_hand():
    expected = [4.605551, 4.464102, 4.316625, 4.162278, 4.0, 3.828427, 3.645751, 3.449490, 3.236068, 3.0,
                2.732051, 2.414214]  # sqrt(13) + 1, sqrt(12) + 1, ..., sqrt(2) + 1
    assert np.allclose(authors_depth_weights(12), expected, atol=1e-6)


# --- the authors' rule, transcribed from their scripts (prune_bert.py, prune_opt.py) -------------

def authors_rule(neuron_scores, head_errors, Rs, mu, variant):
    """The allocation of the authors' scripts, step by step, on arrays as they hold them:
    neuron_scores (L, N) = |diag R| of each layer's pivoted QR, head_errors (L, H) = the output
    error of keeping i heads, Rs the layers' R factors (for the unweighted ||R22||)."""
    L, N = neuron_scores.shape
    H = head_errors.shape[1]
    errs, heads_err = neuron_scores.copy(), head_errors.copy()
    if variant == "bert":
        share = 0.6622759267443489
        weight = np.sqrt(np.arange(L, 0, -1) + 1) + 1  # L+1 .. 2 under the root
        errs = errs * weight[:, None]
        heads_err = heads_err * weight[:, None]
    else:
        share = 0.5714285714285714
        depth = np.arange(1, L + 1)
        slope, intercept = np.polyfit(depth, np.log(errs[:, 0]), deg=1)
        errs = errs / (np.e ** (depth * slope + intercept))[:, None]
        slope, intercept = np.polyfit(depth, np.log(heads_err[:, 0]), deg=1)
        heads_err = heads_err / (np.e ** (depth * slope + intercept))[:, None]
        heads_err = heads_err * 1.125 ** np.arange(H, 0, -1)
    heads_share = 1 - share

    def neuron_counts(mu, heads):
        n = int((mu - heads_share * (heads / H)) / share * N)
        if n < 0:
            return np.zeros(L, dtype=int)
        threshold = -np.sort(-errs.flatten())[n * L]
        return np.sum(errs > threshold, axis=1)

    descending_heads = -np.sort(-heads_err.flatten())
    first = int(mu * H)
    cutoffs, residuals = [], []
    for heads in range(first, H + 1):
        ks = neuron_counts(mu, heads)
        if heads == H:
            cutoffs.append(0)
        else:
            cutoffs.append(descending_heads[heads * L - 1] if variant == "bert" else descending_heads[heads * L])
        residuals.append(np.mean([np.linalg.norm(Rs[l][ks[l]:, ks[l]:]) for l in range(L)]))
    chosen = int(np.argmin(np.abs(np.array(cutoffs) - 2 * np.array(residuals)))) + first
    k_main = np.mean(neuron_counts(mu, chosen)).astype(int)
    threshold = -np.sort(-errs.flatten())[k_main * L]
    neurons = np.sum(errs > threshold, axis=1)
    if chosen == H:
        kept_heads = np.full(L, H)
    elif variant == "bert":
        kept_heads = np.sum(heads_err >= descending_heads[chosen * L - 1], axis=1)
    else:
        kept_heads = np.sum(heads_err > descending_heads[chosen * L], axis=1)
    return kept_heads.tolist(), neurons.tolist()


def authors_inputs(L=6, H=12, N=40, seed=0, growth=1.0):
    """Scores as the scripts compute them: R of the pivoted QR of random activations (columns
    of uneven size), head errors falling with the number kept; layer sizes grow by `growth`."""
    rng = np.random.default_rng(seed)
    neuron_scores, head_errors, Rs, scores = [], [], [], []
    for l in range(L):
        Z = rng.standard_normal((3 * N, N)) * rng.exponential(1.0, N) * growth ** l
        R, _ = scipy.linalg.qr(Z, pivoting=True, mode="r")
        heads = np.sort(rng.uniform(0.2, 1.0, H))[::-1].cumsum()[::-1] * 10 * growth ** l  # keeping 0..H-1
        neuron_scores.append(np.abs(np.diag(R)))
        head_errors.append(heads)
        Rs.append(R)
        scores.append(LayerScores(np.append(heads, 0.0), np.abs(np.diag(R)),
                                  np.array([np.linalg.norm(R[k:, k:]) for k in range(N + 1)])))
    return np.array(neuron_scores), np.array(head_errors), Rs, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mu", [0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_faithful_is_the_bert_script(seed, mu):
    neuron_scores, head_errors, Rs, scores = authors_inputs(seed=seed)
    expected = authors_rule(neuron_scores, head_errors, Rs, mu, "bert")
    costs = Costs(1.0, 1.0)  # not used: the fixed share sets the budget
    assert faithful(scores, *costs, mu, variant="bert", neuron_share=AUTHORS_NEURON_SHARE["encoder"]) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mu", [0.45, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_faithful_is_the_opt_script(seed, mu):
    neuron_scores, head_errors, Rs, scores = authors_inputs(seed=seed, growth=1.4)
    expected = authors_rule(neuron_scores, head_errors, Rs, mu, "opt")
    assert faithful(scores, 1.0, 1.0, mu, variant="opt", neuron_share=AUTHORS_NEURON_SHARE["decoder"]) == expected


def test_the_two_variants_differ_where_the_scripts_do():
    """The golden tests must be able to tell the variants apart on these inputs."""
    neuron_scores, head_errors, Rs, scores = authors_inputs(seed=0, growth=1.4)
    share = AUTHORS_NEURON_SHARE["encoder"]
    results = {(v, mu): faithful(scores, 1.0, 1.0, mu, variant=v, neuron_share=share) for v in ("bert", "opt")
               for mu in (0.5, 0.7)}
    assert results["bert", 0.5] != results["opt", 0.5] or results["bert", 0.7] != results["opt", 0.7]


def test_faithful_with_the_exact_split_stays_within_budget_and_keeps_all_at_mu_one():
    _, _, _, scores = authors_inputs(L=4, H=6, N=40, seed=3)
    costs = unit_costs(64, 16, 30)
    dense = model_macs([6] * 4, [40] * 4, costs)
    for mu in (0.2, 0.5, 0.8):
        heads, neurons = faithful(scores, *costs, mu)
        assert model_macs(heads, neurons, costs) <= mu * dense + 1e-6
    assert faithful(scores, *costs, 1.0) == ([6] * 4, [40] * 4)


def test_faithful_never_exceeds_the_authors_budget_below_the_head_share():
    """Where the scripts would score head counts whose neuron count is negative (and keep heads
    above μ were one chosen), they are not candidates here; and μ < 1/H keeps no head."""
    _, _, _, scores = authors_inputs(L=4, H=6, N=40, seed=4)
    share = AUTHORS_NEURON_SHARE["encoder"]
    prices = {"authors": split_costs(Costs(30.0, 2.0), share, 6, 40), "exact": Costs(30.0, 2.0)}
    for mu in (0.05, 0.1, 0.15, 0.2, 0.3):
        heads, neurons = faithful(scores, 1.0, 1.0, mu, neuron_share=share)
        kept = mac_ratios(prices, ([6] * 4, [40] * 4), (heads, neurons))[1]
        assert kept <= mu + 1e-9
    # μ = 0.05 < (1 - w_n) / 6: only H = 0 has a non-negative neuron count (the scripts would keep
    # every head there: e[-1], the smallest error, is their cut-off)
    heads, neurons = faithful(scores, 1.0, 1.0, 0.05, neuron_share=share)
    assert heads == [0] * 4 and sum(neurons) == 4 * int(0.05 / share * 40)


def test_split_costs_keep_the_layer_total_and_set_the_share():
    exact = unit_costs(768, 64, 30.55)  # BERT-base at QQP's S: Kwon's costs give the authors' share
    authors = split_costs(exact, AUTHORS_NEURON_SHARE["encoder"], 12, 3072)
    assert 12 * authors.attn_unit + 3072 * authors.neuron == pytest.approx(12 * exact.attn_unit + 3072 * exact.neuron)
    assert 3072 * exact.neuron / (12 * exact.attn_unit + 3072 * exact.neuron) == pytest.approx(0.6622759267443489)
    assert authors.neuron == pytest.approx(exact.neuron) and authors.attn_unit == pytest.approx(exact.attn_unit)
    opt = split_costs(unit_costs(768, 64, 2048), 4 / 7, 12, 3072)
    assert 3072 * opt.neuron / (12 * opt.attn_unit + 3072 * opt.neuron) == pytest.approx(4 / 7)
