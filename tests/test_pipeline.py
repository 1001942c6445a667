"""The STAT pipeline against independent computations on tiny random models."""
import copy
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import tiny
from efficiency.macs import adapter_costs, model_macs
from prerequisites.adapters import adapter_for
from prerequisites.layerwise import capture_inputs
from prune.gram import Sketch
from prune.stat import CalibrationWarning, fitted_rows, prune_sequential, stat_prune
from prune.units import PRICE_FOLDS

FAMILIES = {"bert": tiny.bert, "distilbert": tiny.distilbert, "opt": tiny.opt, "llama": tiny.llama}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["stat", "magnitude"])
def test_mu_one_changes_nothing(family, method):
    model = FAMILIES[family]()
    batches = tiny.random_batches()
    expected = tiny.logits(model, batches)
    adapter = adapter_for(model)
    result = stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 1.0, "cpu", method=method,
                        progress=False)
    assert result.attn_units == [adapter.n_attn_units(l) for l in adapter.layers(model)]
    assert torch.equal(tiny.logits(model, batches), expected)


def duplicate_units(model):
    """Make the second half of every layer's heads (KV groups) and neurons copies of the first."""
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in adapter.layers(model):
            half = adapter.n_attn_units(layer) // 2
            for path, rows in adapter.attn_unit_producers():
                lin = adapter.get(layer, path)
                lin.weight[half * rows:2 * half * rows] = lin.weight[:half * rows]
                if lin.bias is not None:
                    lin.bias[half * rows:2 * half * rows] = lin.bias[:half * rows]
            n = adapter.n_neurons(layer) // 2
            for path in adapter.ffn_producers:
                lin = adapter.get(layer, path)
                lin.weight[n:2 * n] = lin.weight[:n]
                if lin.bias is not None:
                    lin.bias[n:2 * n] = lin.bias[:n]
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_duplicated_heads_and_neurons_prune_without_changing_the_output(family):
    model = duplicate_units(FAMILIES[family]())
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=4, batch=8, length=16)
    expected = tiny.logits(model, batches)
    units, neurons = adapter.shape(model)
    calib = capture_inputs(model, adapter, batches, "cpu")
    prune_sequential(model, adapter, calib, [u // 2 for u in units], [n // 2 for n in neurons], "cpu",
                     progress=False)
    assert adapter.shape(model) == ([u // 2 for u in units], [n // 2 for n in neurons])
    got = tiny.logits(model, batches)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    # ...whereas dropping the same number of units without the correction changes it
    plain = copy.deepcopy(duplicate_units(FAMILIES[family]()))
    stat_prune(plain, adapter, batches, adapter_costs(adapter, 16), 0.5, "cpu", method="magnitude", progress=False)
    assert not torch.allclose(tiny.logits(plain, batches), expected, atol=1e-2 * expected.abs().max().item())


def pivoted_qr_order(A):
    return scipy.linalg.qr(A, mode="economic", pivoting=True)[2]


def test_bert_layer_zero_matches_an_independent_computation():
    """Layer 0 of a pruned tiny BERT against pivoted QR and least squares on explicit activations."""
    dense = tiny.bert(layers=2, heads=4, hidden=32, ffn=48)
    batches = tiny.random_batches(n_batches=6, batch=8, length=16)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    result = stat_prune(model, adapter, batches, adapter_costs(adapter, 16), 0.5, "cpu", progress=False)
    h_keep, n_keep = result.attn_units[0], result.neurons[0]
    assert 0 < h_keep < 4 and 0 < n_keep < 48

    layer, pruned = dense.bert.encoder.layer[0], model.bert.encoder.layer[0]
    with torch.no_grad():
        xs, masks, contexts = [], [], []
        for b in batches:
            x = dense.bert.embeddings(input_ids=b["input_ids"])
            mask4d = (1.0 - b["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
            xs.append(x)
            masks.append(mask4d)
            contexts.append(layer.attention.self(x, attention_mask=mask4d)[0])
        real = torch.cat([b["attention_mask"].bool().flatten() for b in batches])
        A = torch.cat([c.reshape(-1, 32) for c in contexts])[real].double().numpy()

    # heads: pivoted QR over whole heads, then least squares of the dropped dims on the kept dims
    heads_as_columns = A.reshape(-1, 4, 8).transpose(1, 0, 2).reshape(4, -1).T
    kept = np.sort(pivoted_qr_order(heads_as_columns)[:h_keep])
    dims = (kept[:, None] * 8 + np.arange(8)).reshape(-1)
    rest = np.setdiff1d(np.arange(32), dims)
    T = np.linalg.lstsq(A[:, dims], A[:, rest], rcond=None)[0]
    W = layer.attention.output.dense.weight.detach().double().numpy()
    W_expected = W[:, dims] + W[:, rest] @ T.T
    assert torch.equal(pruned.attention.self.query.weight, layer.attention.self.query.weight[dims])
    assert np.allclose(pruned.attention.output.dense.weight.detach().numpy(), W_expected, rtol=1e-3, atol=1e-4)

    # neurons: pivoted QR of A·diag(‖W_out[:, j]‖) on the FFN input after the pruned attention
    with torch.no_grad():
        hidden = []
        for x, m in zip(xs, masks):
            h = pruned.attention(x, attention_mask=m)[0]
            hidden.append(layer.intermediate(h))
        F = torch.cat([a.reshape(-1, 48) for a in hidden])[real].double().numpy()
    W_out = layer.output.dense.weight.detach().double().numpy()
    scale = np.linalg.norm(W_out, axis=0)
    kept = np.sort(pivoted_qr_order(F * scale)[:n_keep])
    rest = np.setdiff1d(np.arange(48), kept)
    T = np.linalg.lstsq(F[:, kept], F[:, rest], rcond=None)[0]
    assert torch.equal(pruned.intermediate.dense.weight, layer.intermediate.dense.weight[kept])
    assert np.allclose(pruned.output.dense.weight.detach().numpy(), W_out[:, kept] + W_out[:, rest] @ T.T,
                       rtol=1e-3, atol=1e-4)


def test_padding_never_enters_a_gram():
    """The same sentences calibrate the same model whether or not they share padded batches."""
    padded = tiny.random_batches(n_batches=4, batch=8, length=16)
    alone = []
    for b in padded:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            alone.append({"input_ids": ids[None, :n], "attention_mask": mask[None, :n]})
    junk = [dict(b, input_ids=b["input_ids"].masked_fill(b["attention_mask"] == 0, 999)) for b in padded]
    results = []
    for batches in (alone, junk):
        model = tiny.bert()
        adapter = adapter_for(model)
        stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.5, "cpu", score_fraction=1.0,
                   progress=False)
        results.append(model)
    for (name, p), (_, q) in zip(results[0].named_parameters(), results[1].named_parameters()):
        assert p.shape == q.shape, name
        # float32 rounding differs between padded and unpadded attention; leaked padding would
        # change the weights by orders of magnitude more
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-3 * p.abs().max().item()), name


def test_magnitude_keeps_the_largest_units_uncorrected():
    model = tiny.bert()
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    result = stat_prune(model, adapter, tiny.random_batches(), adapter_costs(adapter, 12), 0.5, "cpu",
                        method="magnitude", progress=False)
    layer, before = model.bert.encoder.layer[1], dense.bert.encoder.layer[1]
    norms = before.intermediate.dense.weight.norm(dim=1) ** 2 + before.output.dense.weight.norm(dim=0) ** 2
    kept = torch.sort(torch.argsort(norms, descending=True)[:result.neurons[1]]).values
    assert torch.equal(layer.intermediate.dense.weight, before.intermediate.dense.weight[kept])
    assert torch.equal(layer.output.dense.weight, before.output.dense.weight[:, kept])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["faithful", "uniform", "greedy"])
def test_achieved_macs_never_exceed_the_target(family, allocation):
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    costs = adapter_costs(adapter, 12)
    dense_macs = model_macs(*adapter.shape(model), costs)
    stat_prune(model, adapter, tiny.random_batches(), costs, 0.4, "cpu", allocation=allocation, progress=False)
    ratio = model_macs(*adapter.shape(model), costs) / dense_macs
    assert 0.3 < ratio <= 0.4 + 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_a_model_with_empty_blocks_again(family):
    """A pruned model (one layer without heads, one without neurons) prunes further."""
    from test_adapters import shrink

    model = shrink(FAMILIES[family](), [0, 1, 2], [40, 0, 50])
    adapter = adapter_for(model)
    batches = tiny.random_batches()
    costs = adapter_costs(adapter, 12)
    before = model_macs(*adapter.shape(model), costs)
    stat_prune(model, adapter, batches, costs, 0.6, "cpu", progress=False)
    heads, neurons = adapter.shape(model)
    assert heads[0] == 0 and neurons[1] == 0
    assert model_macs(heads, neurons, costs) <= 0.6 * before
    assert torch.isfinite(tiny.logits(model, batches)).all()


def test_ffn_then_attn_is_the_authors_bert_order():
    """calibration ffn_then_attn: the FFNs pruned with the dense model's IDs (as one_shot prunes
    them), then layer 1's head IDs measured on the model whose FFNs are pruned and heads intact."""
    dense = tiny.bert(layers=2, heads=4, hidden=32, ffn=48)
    batches = tiny.random_batches(n_batches=6, batch=8, length=16)
    adapter = adapter_for(dense)
    costs = adapter_costs(adapter, 16)
    models = {}
    for mode in ("ffn_then_attn", "one_shot"):
        models[mode] = copy.deepcopy(dense)
        result = stat_prune(models[mode], adapter, batches, costs, 0.5, "cpu", calibration=mode, progress=False)
    h_keep = result.attn_units[1]
    assert 0 < h_keep < 4
    ours, one_shot = models["ffn_then_attn"].bert.encoder.layer, models["one_shot"].bert.encoder.layer
    for l in range(2):  # the same FFNs: dense IDs, same allocation
        assert torch.equal(ours[l].intermediate.dense.weight, one_shot[l].intermediate.dense.weight)
        assert torch.equal(ours[l].output.dense.weight, one_shot[l].output.dense.weight)
    # layer 0's heads see the embeddings either way
    assert torch.equal(ours[0].attention.output.dense.weight, one_shot[0].attention.output.dense.weight)

    ffn_pruned = copy.deepcopy(dense)
    for l in range(2):
        ffn_pruned.bert.encoder.layer[l].intermediate = copy.deepcopy(ours[l].intermediate)
        ffn_pruned.bert.encoder.layer[l].output.dense = copy.deepcopy(ours[l].output.dense)
    layer1 = ffn_pruned.bert.encoder.layer[1]
    contexts = []
    with torch.no_grad():
        for b in batches:
            mask4d = (1.0 - b["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
            x = ffn_pruned.bert.embeddings(input_ids=b["input_ids"])
            x = ffn_pruned.bert.encoder.layer[0](x, attention_mask=mask4d)
            x = x[0] if isinstance(x, tuple) else x
            contexts.append(layer1.attention.self(x, attention_mask=mask4d)[0])
    real = torch.cat([b["attention_mask"].bool().flatten() for b in batches])
    A = torch.cat([c.reshape(-1, 32) for c in contexts])[real].double().numpy()
    heads_as_columns = A.reshape(-1, 4, 8).transpose(1, 0, 2).reshape(4, -1).T
    kept = np.sort(pivoted_qr_order(heads_as_columns)[:h_keep])
    dims = (kept[:, None] * 8 + np.arange(8)).reshape(-1)
    rest = np.setdiff1d(np.arange(32), dims)
    T = np.linalg.lstsq(A[:, dims], A[:, rest], rcond=None)[0]
    W = layer1.attention.output.dense.weight.detach().double().numpy()
    expected = W[:, dims] + W[:, rest] @ T.T
    got = ours[1].attention.output.dense.weight.detach().numpy()
    assert torch.equal(ours[1].attention.self.query.weight, layer1.attention.self.query.weight[dims])
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-4)
    # ...which is not what the dense model's IDs give
    assert not np.allclose(one_shot[1].attention.output.dense.weight.detach().numpy(), expected, rtol=1e-3, atol=1e-4)


def test_the_sketch_follows_its_seed():
    dense = tiny.bert()
    batches = tiny.random_batches(n_batches=3, batch=8, length=16)
    adapter = adapter_for(dense)
    weights = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(dense)
        stat_prune(model, adapter, batches, adapter_costs(adapter, 16), 0.6, "cpu", calibration="one_shot",
                   sketch=Sketch("count", 16, seed), progress=False)
        weights.append(model.bert.encoder.layer[0].output.dense.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert weights[0].shape != weights[2].shape or not torch.equal(weights[0], weights[2])


# --- too few calibration tokens for the units -------------------------------------------------

def test_fitted_rows_counts_real_tokens_and_the_smallest_fit():
    model = tiny.bert()
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=6, batch=4, length=12)
    real = [int(b["attention_mask"].sum()) for b in batches]
    inputs = capture_inputs(model, adapter, batches, "cpu")
    assert fitted_rows(inputs, price_folds=0) == sum(real)
    # held out over 4 folds: batch b in fold b mod 4; each fold's ID is fitted on the other folds' rows
    folds = [real[0] + real[4], real[1] + real[5], real[2], real[3]]
    assert fitted_rows(inputs, price_folds=4) == sum(real) - max(folds)
    one = capture_inputs(model, adapter, batches[:1], "cpu")
    assert fitted_rows(one, price_folds=4) == real[0]  # a single fold: in-sample


def calibration_warnings(model, batches, **kwargs):
    adapter = adapter_for(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stat_prune(model, adapter, batches, adapter_costs(adapter, 12), 0.5, "cpu", progress=False, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, CalibrationWarning)]


def test_too_few_rows_for_the_units_warns_once_naming_the_blocks():
    """An FFN of 64 neurons and attention of 32 dims, calibrated on one batch of 2 x 12 real
    tokens: one warning, naming both kinds of block, the rows and the units, and what to pass."""
    batches = tiny.random_batches(n_batches=1, batch=2, length=12, pad=False)
    caught = calibration_warnings(tiny.bert(layers=3), batches, score_fraction=1.0,
                                  more_tokens=lambda factor: f"--more {factor:.2f}")
    assert len(caught) == 1, caught
    assert "24 rows (tokens)" in caught[0]
    assert "FFN of layers 0-2: 64 neurons" in caught[0] and "attention of layers 0-2: 32 dims" in caught[0]
    assert "at least 2.7x as many tokens (--more 2.67)" in caught[0]  # 64 / 24


def test_enough_rows_for_the_units_do_not_warn():
    batches = tiny.random_batches(n_batches=4, batch=4, length=12, pad=False)  # 192 rows for 64 neurons
    assert calibration_warnings(tiny.bert(layers=3), batches, score_fraction=1.0) == []
    # but pass 1 on a quarter of them (48 rows) is too few, and so is a quarter held out by each fold
    assert len(calibration_warnings(tiny.bert(layers=3), batches, score_fraction=0.25)) == 1
    # held out: two batches of 22 rows per fold, each fold's ID fitted on the others' 44·(folds − 1)
    batches = tiny.random_batches(n_batches=2 * PRICE_FOLDS, batch=2, length=11, pad=False)
    fitted = 44 * (PRICE_FOLDS - 1)
    assert fitted >= 64 and calibration_warnings(tiny.bert(layers=3), batches, pricing="heldout") == []
    assert len(calibration_warnings(tiny.bert(layers=3, ffn=fitted + 8), batches, pricing="heldout")) == 1


def test_ffn_greedy_leaves_the_attention_unmeasured_while_every_head_fits(monkeypatch):
    """ffn_greedy keeps every attention unit while their MACs fit in the budget: pass 1 then
    measures no attention (no attention pruner at all), and the pruned model is the one that
    measuring it would have given; below that budget it falls back to greedy and measures it."""
    import prune.stat as stat

    batches = tiny.random_batches(n_batches=4, batch=4, length=16, pad=False)
    made = []
    monkeypatch.setattr(stat, "attn_pruner", lambda *a, _made=stat.attn_pruner, **k: made.append(1) or _made(*a, **k))
    expected = {}
    for skip in (True, False):
        model = tiny.llama()
        adapter = adapter_for(model)
        monkeypatch.setattr(stat, "keeps_every_head", lambda *a, _skip=skip: _skip)
        made.clear()
        result = stat_prune(model, adapter, batches, adapter_costs(adapter, 16), 0.8, "cpu", allocation="ffn_greedy",
                            progress=False, score_fraction=1.0)
        expected[skip] = (result.attn_units, result.neurons, tiny.logits(model, batches))
        assert (len(made) == 0) == skip  # pass 2 makes none either: every head is kept
    assert expected[True][:2] == expected[False][:2] and torch.equal(expected[True][2], expected[False][2])
    monkeypatch.undo()
    model = tiny.llama()
    adapter = adapter_for(model)
    costs = adapter_costs(adapter, 16)
    assert stat.keeps_every_head(model, adapter, "ffn_greedy", costs, 0.8)
    assert not stat.keeps_every_head(model, adapter, "greedy", costs, 0.8)
    heads_share = 3 * 2 * costs[0] / (3 * 2 * costs[0] + 3 * 64 * costs[1])  # 3 layers, 2 KV groups, 64 neurons
    assert not stat.keeps_every_head(model, adapter, "ffn_greedy", costs, heads_share * 0.99)
