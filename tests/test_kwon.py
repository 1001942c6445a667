"""Kwon et al.'s method (prune/kwon.py, prune/mask_tuning.py, prune/masks.py) against
independent computations on tiny random models: finite differences, hand-worked tables,
brute force, explicit least-squares systems solved by numpy."""
import contextlib

import numpy as np
import pytest
import torch

import tiny
from efficiency.macs import adapter_costs, model_macs
from prerequisites.adapters import adapter_for
from prerequisites.layerwise import capture_inputs
from prune.kwon import fisher, kwon_prune, mask_gradients, rearrange, rearrangement_objective, search_mac
from prune.mask_tuning import damped_lsmr, tune_masks
from prune.masks import UnitMasks, masks_applied, prune_to_masks
from tiny import one_thread  # noqa: F401  (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")


def labelled(batches, qa=False, regression=False, seed=0):
    """The batches with targets of the task loss: class labels, scores, or answer positions."""
    g = torch.Generator().manual_seed(seed)
    for b in batches:
        n, length = b["input_ids"].shape
        if qa:
            b["start_positions"] = torch.randint(0, length, (n,), generator=g)
            b["end_positions"] = torch.randint(0, length, (n,), generator=g)
        elif regression:
            b["labels"] = torch.rand(n, generator=g, dtype=torch.float64) * 5
        else:
            b["labels"] = torch.randint(0, 2, (n,), generator=g)
    return batches


# ---------------------------------------------------------------------------------------------
# Importance


@contextlib.contextmanager
def columns_scaled(linear, columns, factor):
    """The linear map with some input columns multiplied by `factor` (a unit's mask, by hand)."""
    original = linear.weight.detach().clone()
    with torch.no_grad():
        linear.weight[:, columns] *= factor
    try:
        yield
    finally:
        with torch.no_grad():
            linear.weight.copy_(original)


@pytest.mark.parametrize("kind", ["bert classifier", "bert regression", "distilbert qa"])
def test_importance_is_the_sum_of_squared_mini_batch_gradients(kind):
    """Central differences of the task loss in each unit's multiplier (its consumer columns
    scaled by hand, no hooks), per mini-batch, squared and summed."""
    if kind == "distilbert qa":
        model = tiny.distilbert(qa=True, layers=2, ffn=8)
    else:
        model = tiny.bert(num_labels=1 if kind == "bert regression" else 2, layers=2, ffn=8)
    model = model.double()
    adapter = adapter_for(model)
    batches = labelled(tiny.random_batches(n_batches=2, batch=3, length=8), qa="qa" in kind,
                       regression="regression" in kind)
    attn_grads, neuron_grads = mask_gradients(model, adapter, batches, "cpu", progress=False)

    # float64 losses of up to ~10 round by a few 1e-15, which the central difference turns into ~1e-9
    eps, dims = 1e-6, adapter.attn_unit_dims()

    def loss(batch):
        with torch.no_grad():
            return float(model(**batch).loss)

    def gradient(linear, columns):
        values = []
        for batch in batches:
            with columns_scaled(linear, columns, 1 + eps):
                up = loss(batch)
            with columns_scaled(linear, columns, 1 - eps):
                down = loss(batch)
            values.append((up - down) / (2 * eps))
        return np.array(values)

    for l, layer in enumerate(adapter.layers(model)):
        W_O = adapter.get(layer, adapter.attn_consumer)
        by_hand = np.stack([gradient(W_O, slice(u * dims, (u + 1) * dims)) for u in range(adapter.n_attn_units(layer))],
                           axis=1)
        np.testing.assert_allclose(attn_grads[l].numpy(), by_hand, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(fisher(attn_grads[l]).numpy(), (by_hand ** 2).sum(axis=0), rtol=1e-5, atol=1e-12)
        W_2 = adapter.get(layer, adapter.ffn_consumer)
        by_hand = np.stack([gradient(W_2, [j]) for j in range(adapter.n_neurons(layer))], axis=1)
        np.testing.assert_allclose(neuron_grads[l].numpy(), by_hand, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(fisher(neuron_grads[l]).numpy(), (by_hand ** 2).sum(axis=0), rtol=1e-5, atol=1e-12)
    assert np.abs(by_hand).max() > 1e-4  # the comparison is not of zeros


def test_gradients_leave_the_parameters_as_they_were():
    model = tiny.bert()
    model.classifier.weight.requires_grad_(False)  # a caller's choice, restored as it was
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    mask_gradients(model, adapter_for(model), labelled(tiny.random_batches(n_batches=1)), "cpu", progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_gradients_need_labels():
    model = tiny.bert()
    with pytest.raises(ValueError, match="no labels"):
        mask_gradients(model, adapter_for(model), tiny.random_batches(n_batches=1), "cpu", progress=False)


# ---------------------------------------------------------------------------------------------
# Search


def test_search_on_a_hand_worked_table():
    # two layers of 2 heads (4 MACs each) and 3 neurons (1 MAC each); budget 10 MACs.
    heads = [np.array([5.0, 1.0]), np.array([3.0, 0.5])]
    neurons = [np.array([2.0, 2.0, 0.1]), np.array([1.5, 0.2, 0.3])]
    # h = 1: 6 neurons fit, 5 + (2 + 2 + 1.5 + 0.3 + 0.2 + 0.1) = 11.1
    # h = 2: 2 neurons fit, (5 + 3) + (2 + 2) = 12   <- best
    # h = 3 would cost 12 > 10
    attn_keep, neuron_keep = search_mac(heads, neurons, 4.0, 1.0, 10.0)
    assert [k.tolist() for k in attn_keep] == [[True, False], [True, False]]
    assert [k.tolist() for k in neuron_keep] == [[True, True, False], [False, False, False]]


def test_search_never_buys_more_heads_than_the_budget_pays_for():
    # their loop would go on to h = 2 with no neurons (200 > 100 + 1): 8 MACs over a budget of 5
    attn_keep, neuron_keep = search_mac([np.array([100.0, 100.0])], [np.array([1.0, 1.0])], 4.0, 1.0, 5.0)
    assert attn_keep[0].sum() == 1 and neuron_keep[0].sum() == 1
    # not even one head fits: neurons only
    attn_keep, neuron_keep = search_mac([np.array([100.0, 100.0])], [np.array([1.0, 1.0])], 6.0, 1.0, 5.0)
    assert attn_keep[0].sum() == 0 and neuron_keep[0].sum() == 2


@pytest.mark.parametrize("seed", range(5))
def test_search_matches_brute_force(seed):
    """Over every (h ≥ 1, n) that fits, the best summed importance of the top h heads and top n
    neurons is what the search keeps, and it fits."""
    rng = np.random.default_rng(seed)
    heads = [rng.exponential(size=3) for _ in range(3)]
    neurons = [rng.exponential(size=5) for _ in range(3)]
    attn_cost, neuron_cost, budget = 3.0, 1.0, rng.uniform(5, 30)
    attn_keep, neuron_keep = search_mac(heads, neurons, attn_cost, neuron_cost, budget)
    top_heads = np.sort(np.concatenate(heads))[::-1]
    top_neurons = np.sort(np.concatenate(neurons))[::-1]
    best = max(top_heads[:h].sum() + top_neurons[:n].sum() for h in range(1, 10) for n in range(16)
               if h * attn_cost + n * neuron_cost <= budget)
    kept_h, kept_n = sum(k.sum() for k in attn_keep), sum(k.sum() for k in neuron_keep)
    assert kept_h * attn_cost + kept_n * neuron_cost <= budget
    value = sum(h[k].sum() for h, k in zip(heads, attn_keep)) + sum(n[k].sum() for n, k in zip(neurons, neuron_keep))
    assert value == pytest.approx(best)


# ---------------------------------------------------------------------------------------------
# Rearrangement


def test_rearrangement_on_a_hand_worked_layer():
    # two pruned units whose gradients cancel are better pruned together than the two least
    # important ones: the objective goes from ‖(1.8, 0.1)‖² = 3.25 to 0
    grads = torch.tensor([[1.0, -1.0, 0.8], [0.0, 0.0, 0.1]], dtype=torch.float64)  # mini-batches × units
    keep = np.array([False, True, False])  # the search pruned units 0 and 2 (lowest Fisher; 0 ties 1)
    assert rearrangement_objective(keep, grads) == pytest.approx(3.25)
    new_keep = rearrange(keep, grads)
    assert new_keep.tolist() == [False, False, True]
    assert rearrangement_objective(new_keep, grads) == pytest.approx(0.0)


def their_greedy_rearrange(n_pruned, grads):
    """A transcription of their greedy_rearrange, in numpy: the pruned set starts as the n_pruned
    lowest Fisher values; each other unit, in ascending Fisher order, joins it, and the member
    whose removal leaves the smallest ‖Σ g‖² leaves."""
    G = grads.T
    order = np.argsort((G ** 2).sum(axis=1), kind="stable")
    pruned = list(order[:n_pruned])
    for index in order[n_pruned:]:
        pruned.append(index)
        vectors = G[pruned]
        without = vectors.sum(axis=0) - vectors
        del pruned[int(np.argmin((without ** 2).sum(axis=1)))]
    keep = np.ones(G.shape[0], dtype=bool)
    keep[pruned] = False
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_rearrangement_never_increases_the_objective(seed):
    rng = np.random.default_rng(seed)
    units, batches = int(rng.integers(2, 12)), int(rng.integers(1, 6))
    grads = torch.tensor(rng.normal(size=(batches, units)))
    keep = rng.random(units) < 0.5  # any mask, not only a searched one
    new_keep = rearrange(keep, grads)
    assert new_keep.sum() == keep.sum()
    assert rearrangement_objective(new_keep, grads) <= rearrangement_objective(keep, grads) + 1e-12
    # from the mask the search gives (the layer's most important units kept), theirs exactly
    n_pruned = int((~keep).sum())
    searched = np.ones(units, dtype=bool)
    searched[np.argsort(fisher(grads).numpy(), kind="stable")[:n_pruned]] = False
    assert rearrange(searched, grads).tolist() == their_greedy_rearrange(n_pruned, grads.numpy()).tolist()


# ---------------------------------------------------------------------------------------------
# The solver


def stacked_lstsq(ATA, ATB, damp=1.0):
    """min ‖ATA s − ATB‖² + damp²‖s − 1‖², as the stacked system [ATA; damp·I] s = [ATB; damp·1]."""
    n = len(ATB)
    return np.linalg.lstsq(np.vstack([ATA, damp * np.eye(n)]), np.concatenate([ATB, damp * np.ones(n)]),
                           rcond=None)[0]


@pytest.mark.parametrize("seed", range(3))
def test_damped_lsmr_solves_the_stacked_system(seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(40, 6)) * rng.uniform(0.1, 3, size=6)
    ATA, ATB = A.T @ A, A.T @ rng.normal(size=40)
    scales, ok = damped_lsmr(ATA, ATB)
    assert ok
    np.testing.assert_allclose(scales, stacked_lstsq(ATA, ATB), rtol=1e-6, atol=1e-6)


def test_damped_lsmr_one_unit_is_undamped():
    scales, ok = damped_lsmr(np.array([[4.0]]), np.array([6.0]))
    assert ok and scales.tolist() == [1.5]  # ATB / ATA, as their code
    assert not damped_lsmr(np.array([[0.0]]), np.array([6.0]))[1]


@pytest.mark.parametrize("istop,ok", [(0, True), (1, True), (2, True), (3, False), (6, False), (7, False)])
def test_damped_lsmr_reports_lsmr_stopping_on_a_limit_as_failure(monkeypatch, istop, ok):
    """LSMR's status: 0-2 converged, 3/6 condition limit, 7 iteration limit (their `istop < 3`).
    With damping 1 a real system seldom reaches a limit, so the status is set here."""
    import prune.mask_tuning

    real = prune.mask_tuning.lsmr

    def reporting(*args, **kwargs):
        x, _, *rest = real(*args, **kwargs)
        return (x, istop, *rest)

    monkeypatch.setattr(prune.mask_tuning, "lsmr", reporting)
    assert damped_lsmr(np.eye(2) * 3, np.array([1.0, 2.0]))[1] == ok


# ---------------------------------------------------------------------------------------------
# Mask tuning


def run_capturing(model, masks, batches, module):
    """Run the model with `masks` and return, per batch, the (input, residual) that `module`
    (BertSelfOutput, or BertOutput) receives: their code reads these with a forward pre-hook.
    The masks act on the dense layer inside the module, so the input read here is unmasked."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append((args[0].detach(), args[1].detach())))
    try:
        with torch.no_grad(), masks_applied(model, adapter_for(model), masks):
            for batch in batches:
                model(**batch)
    finally:
        handle.remove()
    return seen


def rows(t, batch, first_token):
    return t[:, 0] if first_token else t[batch["attention_mask"].bool()]


def expected_attention_scales(model, teacher, student_so_far, batches, l):
    """Their get_mha_lstsq, on explicit matrices: columns = each kept head's output and ones."""
    layer = model.bert.encoder.layer[l]
    dense = layer.attention.output.dense
    W, dims = dense.weight.detach(), model.config.hidden_size // model.config.num_attention_heads
    kept = torch.nonzero(student_so_far.attn[l]).flatten().tolist()
    columns, targets = [], []
    teacher_runs = run_capturing(model, teacher, batches, layer.attention.output)
    student_runs = run_capturing(model, student_so_far, batches, layer.attention.output)
    for batch, (t_ctx, t_x), (s_ctx, s_x) in zip(batches, teacher_runs, student_runs):
        t_out = (t_ctx * teacher.attn[l].repeat_interleave(dims)) @ W.T + dense.bias + t_x
        targets.append(rows(t_out - dense.bias - s_x, batch, False).reshape(-1))
        s_ctx = rows(s_ctx, batch, False)
        columns.append(torch.stack([(s_ctx[:, u * dims:(u + 1) * dims] @ W[:, u * dims:(u + 1) * dims].T).reshape(-1)
                                    for u in kept] + [torch.ones(s_ctx.shape[0] * W.shape[0], dtype=W.dtype)], dim=1))
    A, B = torch.cat(columns).detach().numpy(), torch.cat(targets).detach().numpy()
    return kept, stacked_lstsq(A.T @ A, A.T @ B)[:-1]


def expected_neuron_scales(model, teacher, student_so_far, batches, l, first_token):
    """Their get_ffn_lstsq on explicit matrices: columns = each kept neuron's output; the
    teacher's output with all of this layer's neurons (their hook reads the unmasked input)."""
    layer = model.bert.encoder.layer[l]
    dense = layer.output.dense
    W = dense.weight.detach()
    kept = torch.nonzero(student_so_far.neurons[l]).flatten().tolist()
    columns, targets = [], []
    teacher_runs = run_capturing(model, teacher, batches, layer.output)
    student_runs = run_capturing(model, student_so_far, batches, layer.output)
    for batch, (t_hidden, t_h), (s_hidden, s_h) in zip(batches, teacher_runs, student_runs):
        t_out = t_hidden @ W.T + dense.bias + t_h
        targets.append(rows(t_out - dense.bias - s_h, batch, first_token).reshape(-1))
        s_hidden = rows(s_hidden, batch, first_token)
        columns.append(torch.stack([(s_hidden[:, j:j + 1] * W[:, j][None, :]).reshape(-1) for j in kept], dim=1))
    A, B = torch.cat(columns).detach().numpy(), torch.cat(targets).detach().numpy()
    return kept, stacked_lstsq(A.T @ A, A.T @ B)


def tiny_masks(model, seed=0):
    """A teacher (milder) and a student (a subset of it) as 0/1 masks."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    ones = UnitMasks.ones(model, adapter)
    teacher = UnitMasks([(torch.rand(m.shape, generator=g) < 0.85).to(m.dtype) for m in ones.attn],
                        [(torch.rand(m.shape, generator=g) < 0.8).to(m.dtype) for m in ones.neurons])
    student = UnitMasks([t * (torch.rand(t.shape, generator=g) < 0.7).to(t.dtype) for t in teacher.attn],
                        [t * (torch.rand(t.shape, generator=g) < 0.7).to(t.dtype) for t in teacher.neurons])
    for masks in (teacher, student):
        masks.attn[0][0] = masks.attn[1][0] = 1.0  # some heads to tune in every layer
        masks.attn[1][1] = 1.0
    return teacher, student


@pytest.mark.parametrize("classification", [True, False])
def test_mask_tuning_solves_the_damped_systems_exactly(classification):
    """Every layer's systems, built from explicit matrices of the model's activations and
    solved by numpy's lstsq, give the tuned scales. The tuning solves its own systems with
    lstsq here, so that the comparison is exact: LSMR (their solver, the default) stops at a
    relative tolerance of 1e-6 of its own estimates, which on the attention system (whose
    constant column's diagonal is tokens × hidden size) leaves errors of ~1e-3 in the scales;
    it is compared with lstsq on its own in the tests above."""
    model = tiny.bert(layers=3, ffn=16).double()
    adapter = adapter_for(model)
    batches = tiny.random_batches(n_batches=2, batch=4, length=10)
    teacher, student = tiny_masks(model)
    tuned, stopped = tune_masks(model, adapter, capture_inputs(model, adapter, batches, "cpu"), teacher, student, "cpu",
                                classification=classification, progress=False,
                                solver=lambda ATA, ATB: (stacked_lstsq(ATA, ATB), True))
    assert stopped is None
    with_lsmr, _ = tune_masks(model, adapter, capture_inputs(model, adapter, batches, "cpu"), teacher, student, "cpu",
                              classification=classification, progress=False)
    for exact, approximate in zip(tuned.attn + tuned.neurons, with_lsmr.attn + with_lsmr.neurons):
        torch.testing.assert_close(approximate, exact, rtol=0, atol=5e-3)
    assert torch.equal(tuned.attn[0], student.attn[0])  # layer 0's heads are not tuned

    L = len(adapter.layers(model))
    for l in range(L):
        # the student as it is when this layer is tuned: the layers below tuned, this one not yet
        so_far = UnitMasks(tuned.attn[:l] + student.attn[l:], tuned.neurons[:l] + student.neurons[l:])
        if l > 0:
            kept, scales = expected_attention_scales(model, teacher, so_far, batches, l)
            np.testing.assert_allclose(tuned.attn[l][kept].numpy(), scales, rtol=1e-9, atol=1e-9)
            assert np.abs(scales - 1).max() > 1e-3  # tuning did something
            so_far.attn[l] = tuned.attn[l]
        kept, scales = expected_neuron_scales(model, teacher, so_far, batches, l, classification and l == L - 1)
        np.testing.assert_allclose(tuned.neurons[l][kept].numpy(), scales, rtol=1e-9, atol=1e-9)
        assert torch.equal(tuned.neurons[l] == 0, student.neurons[l] == 0)  # pruned units stay pruned


@pytest.mark.parametrize("failure", ["solver failure", "scale above 10", "scale below -10"])
def test_tuning_stops_for_the_remaining_layers(failure):
    """Calls in order: layer 0 FFN, layer 1 attention, layer 1 FFN, layer 2 ...; the third fails."""
    model = tiny.bert(layers=3, ffn=16).double()
    adapter = adapter_for(model)
    teacher, student = tiny_masks(model)
    calls = []

    def solver(ATA, ATB):
        calls.append(len(ATB))
        scales, ok = damped_lsmr(ATA, ATB)
        if len(calls) == 3:
            if failure == "solver failure":
                return scales, False
            return np.full_like(scales, 10.01 if failure == "scale above 10" else -10.01), True
        return scales, ok

    inputs = capture_inputs(model, adapter, tiny.random_batches(n_batches=2, batch=4, length=10), "cpu")
    tuned, stopped = tune_masks(model, adapter, inputs, teacher, student, "cpu", solver=solver, progress=False)
    assert stopped == 1 and len(calls) == 3
    assert not torch.equal(tuned.neurons[0], student.neurons[0])  # tuned before the failure
    assert not torch.equal(tuned.attn[1], student.attn[1])
    for masks, l in ((tuned.neurons, 1), (tuned.attn, 2), (tuned.neurons, 2)):  # untouched from there on
        assert torch.equal(masks[l], (student.neurons if masks is tuned.neurons else student.attn)[l])


def test_scales_of_exactly_ten_are_accepted():
    model = tiny.bert(layers=2, ffn=16).double()
    adapter = adapter_for(model)
    teacher, student = tiny_masks(model)
    inputs = capture_inputs(model, adapter, tiny.random_batches(n_batches=1, batch=4, length=10), "cpu")
    tuned, stopped = tune_masks(model, adapter, inputs, teacher, student, "cpu",
                                solver=lambda ATA, ATB: (np.full(len(ATB), 10.0), True), progress=False)
    assert stopped is None
    assert set(tuned.neurons[1].unique().tolist()) == {0.0, 10.0}


# ---------------------------------------------------------------------------------------------
# The masks as a smaller model, and the whole method


@pytest.mark.parametrize("make", [tiny.bert, tiny.distilbert])
def test_masked_model_and_pruned_model_give_the_same_logits(make):
    model = make()
    adapter = adapter_for(model)
    batches = tiny.random_batches()
    g = torch.Generator().manual_seed(1)
    ones = UnitMasks.ones(model, adapter)
    keep = UnitMasks([(torch.rand(m.shape, generator=g) < 0.6).float() for m in ones.attn],
                     [(torch.rand(m.shape, generator=g) < 0.5).float() for m in ones.neurons])
    keep.attn[1].zero_()  # a layer without heads
    keep.neurons[2].fill_(1.0)  # a layer that keeps every neuron
    scales = UnitMasks([0.5 + torch.rand(m.shape, generator=g) for m in ones.attn],
                       [0.5 + torch.rand(m.shape, generator=g) for m in ones.neurons])
    with masks_applied(model, adapter, UnitMasks([k * s for k, s in zip(keep.attn, scales.attn)],
                                                 [k * s for k, s in zip(keep.neurons, scales.neurons)])):
        expected = tiny.logits(model, batches)
    assert not torch.allclose(expected, tiny.logits(model, batches), atol=1e-3)  # the masks matter

    prune_to_masks(model, adapter, keep, scales)
    assert adapter.shape(model) == keep.counts()
    # a removed unit against a zeroed one: the same sums in another order, float32 rounding
    torch.testing.assert_close(tiny.logits(model, batches), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [tiny.bert, tiny.distilbert])
@pytest.mark.parametrize("mu", [0.25, 0.5, 0.8])
def test_kwon_prune_keeps_within_the_budget(make, mu):
    model = make()
    adapter = adapter_for(model)
    costs = adapter_costs(adapter, 10)
    dense = model_macs(*adapter.shape(model), costs)
    batches = labelled(tiny.random_batches(n_batches=3, batch=4, length=10))
    result = kwon_prune(model, adapter, batches, costs, mu, "cpu", classification=True, progress=False)
    assert (result.attn_units, result.neurons) == tuple(adapter.shape(model))
    macs = model_macs(result.attn_units, result.neurons, costs)
    assert mu - costs.neuron / dense <= macs / dense <= mu  # the budget is spent, to less than a neuron
    assert torch.isfinite(tiny.logits(model, batches)).all()


def test_kwon_prune_at_mu_one_removes_nothing():
    """Teacher and student keep everything. The FFN scales then solve ATA s = ATB = ATA·1: they
    stay 1. The attention's constant column is regularised towards 1 like the scales (their
    solver shifts every unknown by 1) while the target needs 0, so the heads' scales move a
    little: the logits change, slightly."""
    model = tiny.bert().double()
    adapter = adapter_for(model)
    batches = labelled(tiny.random_batches(n_batches=2, batch=4, length=10))
    expected = tiny.logits(model, batches)
    shape = adapter.shape(model)
    kwon_prune(model, adapter, batches, adapter_costs(adapter, 10), 1.0, "cpu", progress=False)
    assert adapter.shape(model) == shape
    torch.testing.assert_close(tiny.logits(model, batches), expected, rtol=0, atol=1e-3 * float(expected.std()))
