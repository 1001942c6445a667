"""The corrections beyond the paper (prune/units.py Correction) against independent
computations: least squares on explicitly materialised activations, exact offsets, direct
output errors, brute-force ridge choice."""
import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import prune_bert
import prune_opt
import quantize_opt
import tiny
from efficiency.macs import adapter_costs
from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import load_model, save_pruned
from prerequisites.layerwise import capture_inputs
from prune.stat import prune_sequential, stat_prune
from prune.units import HELDOUT_RIDGES, Correction, UnitPruner, choose_ridge, ridge_fit


class Recorder:
    """The inputs a module receives, batch after batch (a forward pre-hook)."""

    def __init__(self, module):
        self.seen = []
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.seen.append(args[0].detach()))

    def rows(self, masks):
        self.handle.remove()
        return torch.cat([x[m] for x, m in zip(self.seen, masks)]).double().numpy()


def inputs_of(model, modules, batches):
    """{name: rows (real tokens only) of what each module of `model` received over `batches`}."""
    recorders = {name: Recorder(module) for name, module in modules.items()}
    with torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    masks = [b["attention_mask"].bool() for b in batches]
    return {name: r.rows(masks) for name, r in recorders.items()}


def kept_rows(W_new_rows, W_rows):
    """Indices of the rows of W that survive in W_new (producers keep rows unchanged)."""
    return [int(np.flatnonzero((W_rows == row).all(axis=1))[0]) for row in W_new_rows]


@pytest.mark.parametrize("residual", [False, True])
def test_dense_correction_is_least_squares_on_explicit_activations(residual):
    """Layer 1 of a two-layer model pruned with the dense target: its output projections
    equal lstsq(A′_J, A Wᵀ (+ x − x′)) on activations materialised by hooks on whole models."""
    dense = tiny.llama(layers=2, heads=4, kv_heads=4, hidden=32, ffn=48)
    batches = tiny.random_batches(n_batches=6, batch=8, length=16)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    correction = Correction(target="dense", residual=residual)
    prune_sequential(model, adapter, capture_inputs(model, adapter, batches, "cpu"), [2, 2], [24, 24], "cpu",
                     progress=False, correction=correction)
    d_layer, p_layer = dense.model.layers[1], model.model.layers[1]

    # the dense model's layer 1 behind the pruned layer 0: what pruned layer 1 receives
    behind = copy.deepcopy(dense)
    behind.model.layers[0] = copy.deepcopy(model.model.layers[0])
    get = lambda m: {"ctx": m.model.layers[1].self_attn.o_proj, "x": m.model.layers[1].input_layernorm}
    A, A_ = inputs_of(dense, get(dense), batches), inputs_of(behind, get(behind), batches)
    heads = kept_rows(p_layer.self_attn.q_proj.weight.detach().numpy()[::8],
                      d_layer.self_attn.q_proj.weight.detach().numpy()[::8])
    dims = (np.array(heads)[:, None] * 8 + np.arange(8)).reshape(-1)
    W = d_layer.self_attn.o_proj.weight.detach().double().numpy()
    target = A["ctx"] @ W.T + (A["x"] - A_["x"] if residual else 0)
    expected = np.linalg.lstsq(A_["ctx"][:, dims], target, rcond=None)[0].T
    got = p_layer.self_attn.o_proj.weight.detach().double().numpy()
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    # the FFN: behind the pruned attention of layer 1 too
    behind.model.layers[1].self_attn = copy.deepcopy(p_layer.self_attn)
    get = lambda m: {"hidden": m.model.layers[1].mlp.down_proj, "h": m.model.layers[1].post_attention_layernorm}
    A, A_ = inputs_of(dense, get(dense), batches), inputs_of(behind, get(behind), batches)
    kept = kept_rows(p_layer.mlp.up_proj.weight.detach().numpy(), d_layer.mlp.up_proj.weight.detach().numpy())
    W = d_layer.mlp.down_proj.weight.detach().double().numpy()
    target = A["hidden"] @ W.T + (A["h"] - A_["h"] if residual else 0)
    expected = np.linalg.lstsq(A_["hidden"][:, kept], target, rcond=None)[0].T
    got = p_layer.mlp.down_proj.weight.detach().double().numpy()
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # and the self target would have given something else
    self_model = copy.deepcopy(dense)
    prune_sequential(self_model, adapter, capture_inputs(self_model, adapter, batches, "cpu"), [2, 2], [24, 24],
                     "cpu", progress=False)
    assert not torch.allclose(self_model.model.layers[1].mlp.down_proj.weight, p_layer.mlp.down_proj.weight,
                              atol=1e-3)


def offset_activations(seed=0, m=300):
    """Six columns: three random, three exact combinations of them plus a constant each."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((m, 3)) * [1.0, 2.0, 3.0]
    combos = B @ rng.standard_normal((3, 3)) + np.array([5.0, -3.0, 2.0])
    A = np.concatenate([B, combos], axis=1)
    W = rng.standard_normal((4, 6))
    return A, W, rng.standard_normal(4)


@pytest.mark.parametrize("target", ["self", "dense"])
def test_bias_compensation_recovers_an_exact_constant_offset(target):
    A, W, b = offset_activations()
    expected = A @ W.T + b
    outputs = {}
    for bias in (False, True):
        pruner = UnitPruner.neurons(torch.nn.Linear(6, 4).requires_grad_(False), correction=Correction(
            target=target, bias=bias))
        pruner.W, pruner.b = torch.from_numpy(W), torch.from_numpy(b)
        extra = {"A_dense": torch.from_numpy(A)} if target == "dense" else {}
        pruner.add_batch(torch.from_numpy(A), **extra)
        kept, W_new, b_new = pruner.solve().prune(3)
        b_new = b if b_new is None else b_new.numpy()
        outputs[bias] = A[:, kept.numpy()] @ W_new.numpy().T + b_new
    assert np.allclose(outputs[True], expected, atol=1e-5 * np.abs(expected).max())
    # without the constant column the offsets cannot be reproduced
    assert not np.allclose(outputs[False], expected, atol=1e-2 * np.abs(expected).max())


def test_a_layer_left_without_heads_keeps_the_value_bias_constant():
    """With its value weights zero, a BERT layer's attention outputs are exactly its value
    biases: dropping every head then keeps the layer's output with bias compensation, and
    loses it without."""
    dense = tiny.bert(layers=2)
    layer = dense.bert.encoder.layer[0]
    with torch.no_grad():
        layer.attention.self.value.weight.zero_()
        layer.attention.self.value.bias.normal_(0.0, 1.0)
    batches = tiny.random_batches()
    expected = tiny.logits(dense, batches)
    got = {}
    for bias in (False, True):
        model = copy.deepcopy(dense)
        adapter = adapter_for(model)
        prune_sequential(model, adapter, capture_inputs(model, adapter, batches, "cpu"), [0, 4], [64, 64], "cpu",
                         progress=False, correction=Correction(bias=bias))
        assert adapter.n_attn_units(adapter.layers(model)[0]) == 0
        got[bias] = tiny.logits(model, batches)
    assert torch.allclose(got[True], expected, atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(got[False], expected, atol=1e-2 * expected.abs().max().item())


def test_output_space_neuron_errors_are_the_error_after_the_consumer():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((200, 5)) @ rng.standard_normal((5, 12)) + 0.1 * rng.standard_normal((200, 12))
    W = rng.standard_normal((7, 12)) * rng.uniform(0.1, 3.0, 12)
    pruner = UnitPruner.neurons(torch.nn.Linear(12, 7, bias=False).requires_grad_(False))
    pruner.W = torch.from_numpy(W)
    pruner.add_batch(torch.from_numpy(A))
    errors = pruner.solve().output_errors()
    order = pruner.order.numpy()
    for k in (0, 3, 5, 11, 12):
        kept, dropped = order[:k], order[k:]
        fit = A[:, kept] @ pruner.coefficients(k).numpy() if 0 < k < 12 else 0
        E = A[:, dropped] - fit  # the residual of the ID: the error dropping these neurons leaves
        assert errors[k] == pytest.approx(np.linalg.norm(E @ W[:, dropped].T), rel=1e-5, abs=1e-8)


def test_an_ill_conditioned_layer_fits_as_well_as_lstsq():
    """Columns that are near copies of each other at very different scales (condition number
    ~1e9): the refit of the kept columns reproduces the target as well as lstsq on the
    explicit activations does, for both targets."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 6))
    A = np.concatenate([base, base[:, :4] + 1e-5 * rng.standard_normal((400, 4)), base[:, 4:] * 1e3], axis=1)
    A *= np.logspace(-2, 2, 12)
    A_dense = A + 0.05 * rng.standard_normal(A.shape)
    W = rng.standard_normal((5, 12))
    for target in ("self", "dense"):
        pruner = UnitPruner.neurons(torch.nn.Linear(12, 5, bias=False).requires_grad_(False),
                                    correction=Correction(target=target, ridge=1e-8))
        pruner.W = torch.from_numpy(W)
        extra = {"A_dense": torch.from_numpy(A_dense).float()} if target == "dense" else {}
        pruner.add_batch(torch.from_numpy(A).float(), **extra)  # float32, as activations are
        kept, W_new, _ = pruner.solve().prune(8)
        A32 = torch.from_numpy(A).float().double().numpy()
        Y = (A_dense if target == "dense" else A32) @ W.T
        J = kept.numpy()
        best = np.linalg.norm(A32[:, J] @ np.linalg.lstsq(A32[:, J], Y, rcond=None)[0] - Y)
        got = np.linalg.norm(A32[:, J] @ W_new.numpy().T - Y)
        assert got <= best * (1 + 1e-3) + 1e-6 * np.linalg.norm(Y)


def test_choose_ridge_picks_what_explicit_held_out_errors_pick():
    rng = np.random.default_rng(6)
    mixing = rng.standard_normal((10, 10))
    beta = rng.standard_normal((10, 4))
    X, X_h = rng.standard_normal((40, 10)) @ mixing, rng.standard_normal((500, 10)) @ mixing
    Y, Y_h = X @ beta + 3.0 * rng.standard_normal((40, 4)), X_h @ beta + 3.0 * rng.standard_normal((500, 4))
    W0 = (beta + 0.3 * rng.standard_normal(beta.shape)).T  # a prior close to the truth: shrinking pays
    alphas = (1e-8, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3)
    t = torch.from_numpy
    fit, held = (t(X.T @ X), t(X.T @ Y)), (t(X_h.T @ X_h), t(X_h.T @ Y_h))
    explicit = [np.linalg.norm(X_h @ ridge_fit(*fit, t(W0), a).numpy().T - Y_h) for a in alphas]
    best = int(np.argmin(explicit))
    assert 0 < best < len(alphas) - 1  # the test means something: neither edge wins
    assert choose_ridge(fit, held, t(W0), alphas) == alphas[best]
    # and a huge ridge is plain selection: the weights stay where they were
    assert torch.allclose(ridge_fit(*fit, t(W0), 1e9), t(W0), atol=1e-6)


def greedy_order(G):
    """Columns in the order a pivoted Cholesky of G takes them (the largest residual diagonal
    first, then its Schur complement), written out the slow way."""
    R = G.copy()
    order, left = [], list(range(len(G)))
    while left:
        j = max(left, key=lambda i: R[i, i])
        order.append(j)
        left.remove(j)
        R = R - np.outer(R[:, j], R[j, :]) / R[j, j]
    return order


def ridge_id_reference(A, W, k, alpha):
    """The ID of A·diag(‖W_j‖) with a ridge of alpha × its mean diagonal, in numpy: the greedy
    order of the ridged scaled Gram, the ridge-regression coefficients of the dropped scaled
    columns on the kept ones, unscaled and folded into the kept columns of W."""
    s = np.linalg.norm(W, axis=0)
    G = (A * s).T @ (A * s)
    lam = alpha * np.trace(G) / len(G)
    order = greedy_order(G + lam * np.eye(len(G)))
    J, D = order[:k], order[k:]
    T = np.linalg.solve(G[np.ix_(J, J)] + lam * np.eye(k), G[np.ix_(J, D)])
    T = s[J][:, None] * T / s[D][None, :]
    W_new = W[:, J] + W[:, D] @ T.T
    return np.sort(J), W_new[:, np.argsort(J)]


def test_a_fixed_id_ridge_is_the_ridge_regularised_id():
    rng = np.random.default_rng(7)
    A = rng.standard_normal((60, 12)) @ rng.standard_normal((12, 12))
    W = rng.standard_normal((5, 12))
    for alpha in (1e-8, 0.3):
        pruner = UnitPruner.neurons(torch.nn.Linear(12, 5, bias=False).requires_grad_(False),
                                    correction=Correction(id_ridge=alpha))
        pruner.W = torch.from_numpy(W)
        A32 = torch.from_numpy(A).float()
        pruner.add_batch(A32)
        kept, W_new, _ = pruner.solve().prune(7)
        J, W_expected = ridge_id_reference(A32.double().numpy(), W, 7, alpha)
        assert kept.tolist() == J.tolist()
        np.testing.assert_allclose(W_new.numpy(), W_expected, rtol=1e-4, atol=1e-6)
    # the ridge changes the kept set on this data: the test tells the two apart
    assert ridge_id_reference(A, W, 7, 1e-8)[0].tolist() != ridge_id_reference(A, W, 7, 0.3)[0].tolist()


def test_heldout_id_ridge_picks_what_explicit_held_out_errors_pick():
    """--id_ridge heldout: for every candidate ridge the units are chosen anew on the fitting
    batches and refitted; the choice is the candidate whose block reproduces the held-out
    batches' output best; the units and weights are then those of that ridge on all batches."""
    rng = np.random.default_rng(8)
    n, out, k = 16, 6, 6
    mixing = rng.standard_normal((n, n))
    batches = [torch.from_numpy(rng.standard_normal((12, n)) @ mixing + 0.3 * rng.standard_normal((12, n))).float()
               for _ in range(8)]
    W = rng.standard_normal((out, n))
    pruner = UnitPruner.neurons(torch.nn.Linear(n, out, bias=False).requires_grad_(False),
                                correction=Correction(id_ridge="heldout"))
    pruner.W = torch.from_numpy(W)
    for b, A in enumerate(batches):
        pruner.add_batch(A, held_out=b % 4 == 3)
    kept, W_new, _ = pruner.solve().prune(k)

    A_fit = torch.cat([A for b, A in enumerate(batches) if b % 4 != 3]).double().numpy()
    A_h = torch.cat([A for b, A in enumerate(batches) if b % 4 == 3]).double().numpy()
    A_all = torch.cat(batches).double().numpy()

    def units_and_weights(A, alpha):
        s = np.linalg.norm(W, axis=0)
        Gs = (A * s).T @ (A * s)
        J = np.sort(greedy_order(Gs + alpha * np.trace(Gs) / n * np.eye(n))[:k])
        G = A[:, J].T @ A[:, J]
        lam = alpha * np.trace(G) / k
        W_J = np.linalg.solve(G + lam * np.eye(k), A[:, J].T @ (A @ W.T) + lam * W[:, J].T).T
        return J, W_J

    errors, kept_sets = [], set()
    for alpha in HELDOUT_RIDGES:
        J, W_J = units_and_weights(A_fit, alpha)
        kept_sets.add(tuple(J))
        errors.append(np.linalg.norm(A_h[:, J] @ W_J.T - A_h @ W.T))
    best = HELDOUT_RIDGES[int(np.argmin(errors))]
    assert len(kept_sets) > 1  # the candidates do keep different units here
    assert best not in (HELDOUT_RIDGES[0], HELDOUT_RIDGES[-1])  # and neither edge wins
    assert pruner.chosen_ridge == best
    J, W_J = units_and_weights(A_all, best)
    assert kept.tolist() == J.tolist()
    np.testing.assert_allclose(W_new.numpy(), W_J, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("unit_dims,bias", [(1, False), (2, False), (1, True)])
def test_held_out_prices_are_cross_validated_errors_of_the_id(unit_dims, bias):
    """--pricing heldout: pass 1 prices each truncation by cross-validation over 4 folds of
    the batches: each fold gets the error that the ID fitted on the other three leaves on it
    (neurons: the weight-scaled ID; attention units: whole units; with bias compensation, the
    ID of the centred activations, the fold centred on the others' mean, which its bias is
    fitted to); checked against residuals formed explicitly."""
    rng = np.random.default_rng(9)
    n, out = 12, 5
    mixing = rng.standard_normal((n, n))
    shift = rng.standard_normal(n) * 3.0
    batches = [torch.from_numpy(rng.standard_normal((10, n)) @ mixing + (b % 4 == 1) * shift).float()
               for b in range(8)]  # one fold off the others' mean: centring it on its own would hide that
    linear = torch.nn.Linear(n, out, bias=bias).requires_grad_(False)
    make = UnitPruner.neurons if unit_dims == 1 else lambda lin, **kw: UnitPruner.attention(lin, unit_dims, **kw)
    pruner = make(linear, held_out_prices=True, correction=Correction(bias=bias))
    for b, A in enumerate(batches):
        pruner.add_batch(A, fold=b % 4)
    pruner.solve()

    W = linear.weight.double().numpy()
    s = np.linalg.norm(W, axis=0) if unit_dims == 1 else np.ones(n)
    W_s = W / s
    squared, output_squared = np.zeros(n + 1), np.zeros(n // unit_dims + 1)
    for fold in range(4):
        S_fit = torch.cat([A for b, A in enumerate(batches) if b % 4 != fold]).double().numpy() * s
        S_h = torch.cat([A for b, A in enumerate(batches) if b % 4 == fold]).double().numpy() * s
        if bias:
            S_fit, S_h = S_fit - S_fit.mean(axis=0), S_h - S_fit.mean(axis=0)
        G = S_fit.T @ S_fit
        if unit_dims == 1:
            order = greedy_order(G)
        else:
            units = greedy_order(G.reshape(n // 2, 2, n // 2, 2).trace(axis1=1, axis2=3))
            order = [2 * u + d for u in units for d in range(2)]
        for k in range(n + 1):
            J, D = order[:k], order[k:]
            T = np.linalg.lstsq(S_fit[:, J], S_fit[:, D], rcond=None)[0] if k else np.zeros((0, len(D)))
            E = S_h[:, D] - S_h[:, J] @ T
            squared[k] += np.linalg.norm(E) ** 2
            if k % unit_dims == 0:
                output_squared[k // unit_dims] += np.linalg.norm(E @ W_s[:, D].T) ** 2
    scale = np.sqrt(squared[0])
    np.testing.assert_allclose(pruner.errors(), np.sqrt(squared), rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(pruner.output_errors(), np.sqrt(output_squared), rtol=1e-4, atol=1e-6 * scale)


def test_held_out_pricing_scores_every_batch_and_prunes():
    model = tiny.bert(layers=2)
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=8)
    result = stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.5, "cpu", progress=False,
                        pricing="heldout")
    in_sample = stat_prune(tiny.bert(layers=2), adapter_for(model), batches, adapter_costs(adapter, 12), 0.5, "cpu",
                           progress=False, score_fraction=1.0)
    for got, fitted in zip(result.scores, in_sample.scores):  # other prices, on the same batches
        assert len(got.neuron_errors) == len(fitted.neuron_errors)
        assert not np.allclose(got.neuron_errors, fitted.neuron_errors)
        assert np.allclose(got.neuron_pivots, fitted.neuron_pivots)  # the pivots: of all the rows, as before
    assert torch.isfinite(tiny.logits(model, batches)).all()


def test_heldout_id_ridge_prunes_a_model_and_records_its_choices():
    model = tiny.llama()
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=8, pad=False)
    result = stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.6, "cpu", allocation="greedy",
                        progress=False, correction=Correction(id_ridge="heldout"))
    chosen = [r for pair in result.ridges for r in pair if r is not None]
    assert chosen and set(chosen) <= set(HELDOUT_RIDGES)
    assert torch.isfinite(tiny.logits(model, batches)).all()


def test_heldout_ridge_prunes_and_records_its_choices():
    model = tiny.bert(layers=2)
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=8)
    result = stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.5, "cpu", progress=False,
                        correction=Correction(target="dense", residual=True, bias=True, ridge="heldout"),
                        neuron_errors="output")
    chosen = [r for pair in result.ridges for r in pair if r is not None]
    assert chosen and all(r > 0 for r in chosen)
    assert torch.isfinite(tiny.logits(model, batches)).all()


def test_an_added_bias_reloads_with_plain_from_pretrained(tmp_path):
    """Llama has no bias on o_proj/down_proj: bias compensation with add_bias gives them one,
    and the checkpoint records it (stat_layout) so it loads anywhere."""
    model = tiny.llama()
    adapter = adapter_for(model)
    batches = tiny.random_batches(pad=False)
    stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.6, "cpu", allocation="greedy", progress=False,
               correction=Correction(bias=True, add_bias=True))
    assert model.model.layers[1].mlp.down_proj.bias is not None
    expected = tiny.logits(model, batches)
    save_pruned(model, str(tmp_path))
    for reloaded in (load_model(str(tmp_path)),
                     AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()):
        assert reloaded.model.layers[1].mlp.down_proj.bias is not None
        assert torch.equal(tiny.logits(reloaded, batches), expected)


@pytest.mark.parametrize("script,argv,expected", [
    (prune_opt, ["--residual_correction"], "--residual_correction needs --correction dense"),
    (prune_opt, ["--correction", "dense", "--protocol", "paper"],
     "--correction dense needs --calibration sequential or dense_ffn, not one_shot (the paper protocol's)"),
    (quantize_opt, ["--wbits", "4", "--correction", "dense", "--calibration", "one_shot"],
     "--correction dense needs --calibration sequential or dense_ffn, not one_shot"),
    (prune_bert, ["--correction", "dense", "--protocol", "paper"],
     "--correction dense needs --calibration sequential or dense_ffn, not ffn_then_attn (the paper protocol's)"),
    (prune_opt, ["--method", "magnitude", "--bias_compensation", "existing"],
     "--bias_compensation apply to --method stat, not magnitude"),
    (prune_bert, ["--method", "kwon", "--correction_ridge", "heldout"],
     "--correction_ridge: not used by --method kwon"),
    (prune_opt, ["--correction_ridge", "-1"], "correction ridge must be positive"),
    (prune_opt, ["--correction_ridge", "big"], "correction ridge must be id, heldout or a positive number"),
    (prune_opt, ["--id_ridge", "0"], "ID ridge must be positive"),
    (prune_bert, ["--id_ridge", "id"], "ID ridge must be heldout or a positive number"),
    (prune_opt, ["--id_ridge", "heldout", "--correction_ridge", "heldout"],
     "the held-out batches choose one ridge, not both"),
    (prune_bert, ["--method", "magnitude", "--id_ridge", "0.1"], "--id_ridge apply to --method stat"),
    (prune_opt, ["--score_fraction", "0.25"], "--score_fraction: --pricing heldout scores pass 1 on every"),
    (prune_bert, ["--pricing", "heldout", "--score_fraction", "0.5"], "--pricing heldout scores pass 1 on every"),
])
def test_correction_flags_that_cannot_work_are_one_line_errors(script, argv, expected, capsys):
    base = ["--model_name", "m", "--mu", "0.5"] + (["--task_name", "t"] if script is prune_bert else [])
    with pytest.raises(SystemExit) as info:
        script.parse_args(base + argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_correction_flags_resolve_from_the_protocol_and_win_over_it():
    from pipelines import protocol
    from pipelines.flags import correction_of

    args = prune_opt.parse_args(["--model_name", "m", "--mu", "0.5", "--protocol", "paper", "--calibration",
                                 "sequential", "--correction", "dense", "--residual_correction",
                                 "--correction_ridge", "0.1", "--pricing", "heldout", "--id_ridge", "0.01"])
    knobs = protocol.resolve(args, protocol.DECODER)
    assert (knobs["pricing"], knobs["id_ridge"]) == ("heldout", 0.01)
    assert (knobs["correction"], knobs["residual_correction"], knobs["correction_ridge"]) == ("dense", True, 0.1)
    assert (knobs["bias_compensation"], knobs["neuron_errors"]) == ("off", "id")  # the paper's, not given
    assert correction_of(args) == Correction(target="dense", residual=True, ridge=0.1, id_ridge=0.01)
    magnitude = prune_bert.parse_args(["--model_name", "m", "--task_name", "t", "--mu", "0.5", "--method",
                                       "magnitude", "--pricing", "heldout"])  # its allocation is STAT's
    assert magnitude.pricing == "heldout" and magnitude.score_fraction == 1.0  # recorded as pass 1 will score
    paper = prune_bert.parse_args(["--model_name", "m", "--task_name", "t", "--mu", "0.5", "--protocol", "paper"])
    protocol.resolve(paper, protocol.ENCODER)
    assert correction_of(paper) == Correction()  # the authors' correction: the ID's own
