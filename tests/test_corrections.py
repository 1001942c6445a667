"""How STAT corrects and prices (prune/units.py), against independent computations: the dense
target as least squares on explicitly materialised activations, an ill-conditioned refit
against lstsq, held-out prices against residuals formed fold by fold; and the flags."""
import copy

import numpy as np
import pytest
import torch

import prune_bert
import prune_opt
import quantize_opt
import tiny
from efficiency.macs import adapter_costs
from prerequisites.adapters import adapter_for
from prerequisites.layerwise import capture_inputs
from prune.stat import prune_sequential, stat_prune
from prune.units import UnitPruner


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


def test_dense_correction_is_least_squares_on_explicit_activations():
    """Layer 1 of a two-layer model pruned with the dense target: its output projections
    equal lstsq(A′_J, A Wᵀ + x − x′) on activations materialised by hooks on whole models."""
    dense = tiny.llama(layers=2, heads=4, kv_heads=4, hidden=32, ffn=48)
    batches = tiny.random_batches(n_batches=6, batch=8, length=16)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    prune_sequential(model, adapter, capture_inputs(model, adapter, batches, "cpu"), [2, 2], [24, 24], "cpu",
                     progress=False, correction="dense")
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
    target = A["ctx"] @ W.T + A["x"] - A_["x"]
    expected = np.linalg.lstsq(A_["ctx"][:, dims], target, rcond=None)[0].T
    got = p_layer.self_attn.o_proj.weight.detach().double().numpy()
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

    # the FFN: behind the pruned attention of layer 1 too
    behind.model.layers[1].self_attn = copy.deepcopy(p_layer.self_attn)
    get = lambda m: {"hidden": m.model.layers[1].mlp.down_proj, "h": m.model.layers[1].post_attention_layernorm}
    A, A_ = inputs_of(dense, get(dense), batches), inputs_of(behind, get(behind), batches)
    kept = kept_rows(p_layer.mlp.up_proj.weight.detach().numpy(), d_layer.mlp.up_proj.weight.detach().numpy())
    W = d_layer.mlp.down_proj.weight.detach().double().numpy()
    target = A["hidden"] @ W.T + A["h"] - A_["h"]
    expected = np.linalg.lstsq(A_["hidden"][:, kept], target, rcond=None)[0].T
    got = p_layer.mlp.down_proj.weight.detach().double().numpy()
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    # and the self target would have given something else
    self_model = copy.deepcopy(dense)
    prune_sequential(self_model, adapter, capture_inputs(self_model, adapter, batches, "cpu"), [2, 2], [24, 24],
                     "cpu", progress=False)
    assert not torch.allclose(self_model.model.layers[1].mlp.down_proj.weight, p_layer.mlp.down_proj.weight,
                              atol=1e-3)


def test_an_ill_conditioned_layer_fits_as_well_as_lstsq():
    """Columns that are near copies of each other at very different scales (condition number
    ~1e9): the refit of the kept columns reproduces the target as well as lstsq on the
    explicit activations does, for both targets (the dense one without a residual gap here)."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((400, 6))
    A = np.concatenate([base, base[:, :4] + 1e-5 * rng.standard_normal((400, 4)), base[:, 4:] * 1e3], axis=1)
    A *= np.logspace(-2, 2, 12)
    A_dense = A + 0.05 * rng.standard_normal(A.shape)
    W = rng.standard_normal((5, 12))
    for target in ("self", "dense"):
        pruner = UnitPruner.neurons(torch.nn.Linear(12, 5, bias=False).requires_grad_(False), target=target)
        pruner.W = torch.from_numpy(W)
        extra = {"A_dense": torch.from_numpy(A_dense).float(), "residual": torch.zeros(400, 5)} \
            if target == "dense" else {}
        pruner.add_batch(torch.from_numpy(A).float(), **extra)  # float32, as activations are
        kept, W_new = pruner.solve().prune(8)
        A32 = torch.from_numpy(A).float().double().numpy()
        Y = (A_dense if target == "dense" else A32) @ W.T
        J = kept.numpy()
        best = np.linalg.norm(A32[:, J] @ np.linalg.lstsq(A32[:, J], Y, rcond=None)[0] - Y)
        got = np.linalg.norm(A32[:, J] @ W_new.numpy().T - Y)
        assert got <= best * (1 + 1e-3) + 1e-6 * np.linalg.norm(Y)


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


@pytest.mark.parametrize("unit_dims", [1, 2])
def test_held_out_prices_are_cross_validated_errors_of_the_id(unit_dims):
    """--pricing heldout: pass 1 prices each truncation by cross-validation over folds (4 here) of
    the batches: each fold gets the error that the ID fitted on the other three leaves on it
    (neurons: the weight-scaled ID's error; attention units: whole units, the error after the
    output projection); checked against residuals formed explicitly."""
    rng = np.random.default_rng(9)
    n, out = 12, 5
    mixing = rng.standard_normal((n, n))
    shift = rng.standard_normal(n) * 3.0
    batches = [torch.from_numpy(rng.standard_normal((10, n)) @ mixing + (b % 4 == 1) * shift).float()
               for b in range(8)]  # one fold unlike the others
    linear = torch.nn.Linear(n, out, bias=False).requires_grad_(False)
    make = UnitPruner.neurons if unit_dims == 1 else lambda lin, **kw: UnitPruner.attention(lin, unit_dims, **kw)
    pruner = make(linear, price_folds=4)
    for b, A in enumerate(batches):
        pruner.add_batch(A, fold=b % 4)
    pruner.solve()

    W = linear.weight.double().numpy()
    s = np.linalg.norm(W, axis=0) if unit_dims == 1 else np.ones(n)
    W_s = W / s
    squared = np.zeros(n // unit_dims + 1)
    for fold in range(4):
        S_fit = torch.cat([A for b, A in enumerate(batches) if b % 4 != fold]).double().numpy() * s
        S_h = torch.cat([A for b, A in enumerate(batches) if b % 4 == fold]).double().numpy() * s
        G = S_fit.T @ S_fit
        if unit_dims == 1:
            order = greedy_order(G)
        else:
            units = greedy_order(G.reshape(n // 2, 2, n // 2, 2).trace(axis1=1, axis2=3))
            order = [2 * u + d for u in units for d in range(2)]
        for k in range(0, n + 1, unit_dims):
            J, D = order[:k], order[k:]
            T = np.linalg.lstsq(S_fit[:, J], S_fit[:, D], rcond=None)[0] if k else np.zeros((0, len(D)))
            E = S_h[:, D] - S_h[:, J] @ T
            squared[k // unit_dims] += np.linalg.norm(E if unit_dims == 1 else E @ W_s[:, D].T) ** 2
    scale = np.sqrt(squared[0])
    np.testing.assert_allclose(pruner.prices(), np.sqrt(squared), rtol=1e-4, atol=1e-6 * scale)
    # and they are not the in-sample prices
    in_sample = make(linear)
    for A in batches:
        in_sample.add_batch(A)
    assert not np.allclose(in_sample.solve().prices(), pruner.prices(), rtol=1e-2)


@pytest.mark.parametrize("factor", ["lapack", "torch"])
def test_held_out_prices_in_float32_agree_with_float64(factor):
    """Each fold's fit is factored in float64 and priced in float32 (ssygst and slauum on the
    host, triangular solves and a product with torch): against
    the same cross-validation all in float64, on a block of 300 units whose spectrum falls
    over three decades, the prices agree to 3e-4 (2.6e-5 measured on one machine) wherever they
    exceed 1 % of the block's whole error, and within 1e-3 of it everywhere."""
    g = torch.Generator().manual_seed(4)
    n = 300
    mixing = torch.randn(n, n, generator=g) / n ** 0.5 * torch.logspace(0, -3, n)[:, None]
    linear = torch.nn.Linear(n, 64).requires_grad_(False)
    pruner = UnitPruner.neurons(linear, price_folds=3, factor=factor)
    for b in range(6):
        pruner.add_batch(torch.randn(200, n, generator=g) @ mixing, fold=b % 3)
    folds = [gram.products for gram in pruner.grams]
    pruner.dim_scale = pruner.W.norm(dim=0)
    single = pruner._cross_validated_prices(folds).numpy()
    double = float64_prices(pruner, folds)
    large = double > 1e-2 * double[0]
    np.testing.assert_allclose(single[large], double[large], rtol=3e-4)
    np.testing.assert_allclose(single, double, rtol=0, atol=1e-3 * double[0])
    assert not np.array_equal(single, double)  # it did run in float32


def float64_prices(pruner, folds):
    """The cross-validated prices of UnitPruner._cross_validated_prices, every step in float64."""
    dims, squared = pruner.W.shape[1], 0.0
    for f, held in enumerate(folds):
        G_fit = sum(other[:, :dims].double() for other in folds[:f] + folds[f + 1:])
        factor = pruner._factor(pruner._scaled(G_fit))[1]
        squared = squared + factor.heldout_errors(held[:, :dims].double(), scale=pruner.dim_scale) ** 2
    return squared.sqrt().numpy()


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
        # the pivots: of all the rows, as before (float32 folds summed, against a float64 Gram)
        assert np.allclose(got.neuron_pivots, fitted.neuron_pivots, rtol=1e-4)
    assert torch.isfinite(tiny.logits(model, batches)).all()


@pytest.mark.parametrize("script,argv,expected", [
    (prune_opt, ["--correction", "dense", "--protocol", "paper"],
     "--correction dense needs --calibration sequential or dense_ffn, not one_shot (the paper protocol's)"),
    (quantize_opt, ["--wbits", "4", "--correction", "dense", "--calibration", "one_shot"],
     "--correction dense needs --calibration sequential or dense_ffn, not one_shot"),
    (prune_bert, ["--correction", "dense", "--protocol", "paper"],
     "--correction dense needs --calibration sequential or dense_ffn, not ffn_then_attn (the paper protocol's)"),
    (prune_opt, ["--method", "magnitude", "--correction", "dense"],
     "--correction apply to --method stat, not magnitude"),
    (prune_bert, ["--method", "kwon", "--pricing", "heldout"], "--pricing: not used by --method kwon"),
    (prune_opt, ["--score_fraction", "0.25"], "--score_fraction: --pricing heldout scores pass 1 on every"),
    (prune_bert, ["--pricing", "heldout", "--score_fraction", "0.5"], "--pricing heldout scores pass 1 on every"),
])
def test_correction_flags_that_cannot_work_are_one_line_errors(script, argv, expected, capsys):
    base = ["--model_name", "m", "--mu", "0.5"] + (["--task_name", "t"] if script is prune_bert else [])
    with pytest.raises(SystemExit) as info:
        script.parse_args(base + argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("removed", ["--residual_correction", "--bias_compensation", "--correction_ridge",
                                     "--neuron_errors", "--id_ridge"])
def test_the_knobs_that_never_measured_a_gain_are_gone(removed, capsys):
    with pytest.raises(SystemExit) as info:
        prune_opt.parse_args(["--model_name", "m", "--mu", "0.5", removed, "1"])
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_correction_flags_resolve_from_the_protocol_and_win_over_it():
    from pipelines import protocol

    args = prune_opt.parse_args(["--model_name", "m", "--mu", "0.5", "--protocol", "paper", "--calibration",
                                 "sequential", "--correction", "dense", "--pricing", "heldout"])
    knobs = protocol.resolve(args, protocol.DECODER)
    assert (knobs["pricing"], knobs["correction"]) == ("heldout", "dense")
    assert knobs["allocation"] == "faithful"  # the paper's, not given
    improved = prune_opt.parse_args(["--model_name", "m", "--mu", "0.5"])
    assert protocol.resolve(improved, protocol.DECODER)["pricing"] == "heldout"  # the decoders' default
    magnitude = prune_bert.parse_args(["--model_name", "m", "--task_name", "t", "--mu", "0.5", "--method",
                                       "magnitude", "--pricing", "heldout"])  # its allocation is STAT's
    assert magnitude.pricing == "heldout" and magnitude.score_fraction == 1.0  # recorded as pass 1 will score
    paper = prune_bert.parse_args(["--model_name", "m", "--task_name", "t", "--mu", "0.5", "--protocol", "paper"])
    assert protocol.resolve(paper, protocol.ENCODER)["correction"] == "self"  # the authors': the ID's own
