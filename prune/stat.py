"""The STAT pipeline (docs/design.md §4), layer by layer, for any model an adapter describes.

1. Capture the inputs of the first layer for every calibration batch.
2. Pass 1, on the dense model: run the layers one at a time over all batches, feeding each
   layer's two UnitPruners (attention units, FFN neurons), and score the units; allocate the
   budget across layers.
3. Pass 2, from the bottom: for each layer, new UnitPruners are fed the outputs of the
   already pruned layers below it, so that each layer's ID is that of the inputs it will
   really receive; the attention units are pruned, then (with the pruned attention in place)
   the neurons. With the default correction each block reproduces its own output given those
   inputs (the error that arrives from below is carried, not undone); with correction
   'dense' the dense model's layer inputs are carried alongside, through the same layers
   before they are pruned, and each block reproduces the dense model's output and the
   residual stream's gap instead (docs/design.md §4).

Only one layer and the calibration activations are on the device at a time (the runtime of
prerequisites/layerwise.py), which is what lets a large model prune on one GPU. Inside a layer
the activations at the two cut points are reused: the kept units' outputs do not change when
other units go, so the attention is run once per batch.
"""
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from prerequisites.layerwise import capture_inputs, each_layer
from prune.allocation import ALLOCATORS, LayerScores, round_neurons
from prune.interpolative import FACTORS, expand_groups, resolve_factor
from prune.search import Fitness, LevelDatabase, measured_weights, search as search_widths, widths_problem
from prune.units import PRICE_FOLDS, TARGETS, MagnitudePruner, UnitPruner

# every pruning method, the one list the flags offer: stat and magnitude run through
# stat_prune below; kwon (Kwon et al. 2022) needs labelled batches and runs through
# prune/kwon.py's kwon_prune
METHODS = ("stat", "magnitude", "kwon")
# Where each layer's IDs (the choice of units and the correction) are measured:
# sequential: both IDs of a layer on the pruned layers below it (docs/design.md §4);
# dense_ffn: only the attention IDs re-measured so, the FFN IDs from the dense model;
# one_shot: every ID from the dense model (the authors' OPT order: all IDs on the dense model,
#   then FFNs and heads pruned; with every ID fixed beforehand, the order of pruning is moot);
# ffn_then_attn: the authors' BERT order: the FFN IDs from the dense model and every FFN pruned,
#   then the attention IDs measured on that FFN-pruned model (all its heads still there) and
#   every head pruned.
CALIBRATIONS = ("sequential", "dense_ffn", "one_shot", "ffn_then_attn")
# what each correction reproduces (prune/units.py): 'self', the block's own output on the
# inputs it receives; 'dense', the dense model's output and the residual stream's gap (the
# dense model's activations carried beside the pruned model's: pass 2 must measure them)
CORRECTIONS = TARGETS
DENSE_TARGET_CALIBRATIONS = ("sequential", "dense_ffn")
# what pass 1's prices are measured on: the calibration batches the IDs are fitted on
# ('insample'), or ('heldout') cross-validated: the batches in PRICE_FOLDS folds (batch b in
# fold b mod PRICE_FOLDS), each priced by the ID fitted on the others: the error each truncation will
# really leave on data it was not fitted on (pass 1 then scores every batch)
PRICINGS = ("insample", "heldout")
# allocations judged on the whole model's output, from pass 1's IDs (prune/search.py): they need
# SearchSettings (the held-out batches, the start allocator; search also its budget)
END_TO_END = ("search", "measured")


class CalibrationWarning(UserWarning):
    """Fewer calibration rows (tokens) than a block has units: its IDs are underdetermined."""


@dataclass
class PruneResult:
    attn_units: list  # per layer: heads, or KV groups with grouped-query attention
    neurons: list
    scores: list = field(default_factory=list)
    allocation: str = ""
    seconds: float = 0.0
    factor: str = ""  # who computed the pivoted Cholesky factorisations: torch or lapack
    search: object = None  # the SearchResult of --allocation search
    measured: dict = None  # what --allocation measured measured (prune.search.measured_weights)


def attn_pruner(adapter, layer, sketch=None, target="self", price_folds=0, factor="lapack"):
    """The UnitPruner of a layer's attention units (None when it has none left)."""
    if not adapter.n_attn_units(layer):
        return None
    return UnitPruner.attention(adapter.get(layer, adapter.attn_consumer), adapter.attn_unit_dims(), sketch, target,
                                price_folds, factor)


def neuron_pruner(adapter, layer, sketch=None, target="self", price_folds=0, factor="lapack"):
    """The UnitPruner of a layer's FFN neurons (None when it has none left)."""
    if not adapter.n_neurons(layer):
        return None
    return UnitPruner.neurons(adapter.get(layer, adapter.ffn_consumer), sketch, target, price_folds, factor)


def layer_scores(attn, neurons, attn_units=0):
    """What the solved pruners of one dense layer say every truncation costs (an empty block
    scores as nothing to keep; an attention block that was not measured, as free to drop)."""
    attn_errors = attn.prices() if attn else np.zeros(attn_units + 1)
    if neurons is None:
        return LayerScores(attn_errors, np.zeros(0), np.zeros(1))
    return LayerScores(attn_errors, neurons.pivots(), neurons.prices())


def fitted_rows(inputs, price_folds=0, sketch=None):
    """The fewest calibration rows any of pass 1's IDs is fitted on: every real token (or the
    rows a sketch leaves of them), or with held-out prices (folds of batch b mod price_folds)
    every row but one fold's."""
    rows = []
    for x, m in zip(inputs.hidden, inputs.masks):
        per_window = m.sum(-1).tolist() if m is not None else [x.shape[-2]] * x.shape[:-2].numel()
        rows.append(sketch.rows_kept(per_window) if sketch else sum(per_window))
    folds = [sum(rows[f::price_folds]) for f in range(price_folds)]
    if sum(1 for f in folds if f) < 2:
        return sum(rows)
    return sum(rows) - max(folds)


def warn_if_too_few_rows(model, adapter, rows, more_tokens):
    """One CalibrationWarning naming the blocks whose Grams have fewer rows than columns (an
    FFN's neurons, an attention block's dims), and what to calibrate on instead: more_tokens,
    given the factor by which the calibration tokens must grow, says how (the flag to pass)."""
    thin = {}  # (kind, columns) -> layers
    for l, layer in enumerate(adapter.layers(model)):
        for kind, columns in (("FFN", adapter.n_neurons(layer)),
                              ("attention", adapter.n_attn_units(layer) * adapter.attn_unit_dims())):
            if columns > rows:
                thin.setdefault((kind, columns), []).append(l)
    if not thin:
        return
    blocks = "; ".join(f"{kind} of layers {_spans(layers)}: {columns} {'neurons' if kind == 'FFN' else 'dims'}"
                       for (kind, columns), layers in thin.items())
    factor = max(columns for _, columns in thin) / max(rows, 1)
    warnings.warn(f"too few calibration tokens: pass 1 fits the IDs on {rows} rows (tokens), fewer than the units of "
                  f"these blocks ({blocks}), so their IDs are underdetermined and the allocation degenerates; "
                  f"calibrate on at least {math.ceil(factor * 10) / 10}x as many tokens"
                  + (f" ({more_tokens(factor)})" if more_tokens else ""), CalibrationWarning, stacklevel=3)


def _spans(indices):
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


@torch.no_grad()
def measure_dense(model, adapter, inputs, device, keep=(), sketch=None, ffn=True, attn=True,
                  progress=True, desc="pass 1: dense Grams", store=None, price_folds=0, factor="lapack"):
    """Pass 1: every layer's pruners fed on the model as it is (dense, but for ffn_then_attn),
    and the scores they give; and the solved pruners of the blocks named in `keep` ("attn",
    "ffn"; the others None), to prune from these IDs. ffn=False: the attention's only;
    attn=False: the FFN's only (the attention units scored as free, all of them kept).
    On the dense model both correction targets agree: the block's own output. price_folds: 0
    (in-sample prices), or the folds of held-out prices (batch b in fold b mod price_folds)."""
    scores, pruners = [], []
    for _, layer in each_layer(model, adapter, device, store, desc=desc, progress=progress):
        units = adapter.n_attn_units(layer)
        attn = attn_pruner(adapter, layer, sketch, price_folds=price_folds, factor=factor) if attn else None
        neurons = neuron_pruner(adapter, layer, sketch, price_folds=price_folds, factor=factor) if ffn else None
        for b, (x, extras, mask) in enumerate(zip(inputs.hidden, inputs.extras, inputs.masks)):
            context = adapter.attention_context(layer, x, extras)
            fold = b % price_folds if price_folds else 0
            if attn:
                attn.add_batch(context, mask, fold=fold)
            h = adapter.after_attention(layer, context, x)
            hidden = adapter.ffn_hidden(layer, h)
            if neurons:
                neurons.add_batch(hidden, mask, fold=fold)
            inputs.hidden[b] = adapter.after_ffn(layer, hidden, h)
        for pruner in (attn, neurons):
            if pruner:
                pruner.solve()
        scores.append(layer_scores(attn, neurons, units))
        if keep:  # off the device: only the layer being worked on may be there
            pruners.append(tuple(p.to("cpu") if p and kind in keep else None
                                 for kind, p in (("attn", attn), ("ffn", neurons))))
    return scores, pruners


def magnitude_pruners(adapter, layer):
    attn = neurons = None
    if adapter.n_attn_units(layer):
        attn = MagnitudePruner(adapter.get(layer, adapter.attn_consumer).weight, attn_weight_norms(adapter, layer),
                               adapter.attn_unit_dims())
    if adapter.n_neurons(layer):
        neurons = MagnitudePruner(adapter.get(layer, adapter.ffn_consumer).weight, neuron_weight_norms(adapter, layer))
    return attn, neurons


def attn_weight_norms(adapter, layer):
    """Norm of all the weights that belong to each unit (its Q, K, V rows and O columns)."""
    n, unit_dims = adapter.n_attn_units(layer), adapter.attn_unit_dims()
    sq = torch.zeros(n, dtype=torch.float64)
    for path, rows in adapter.attn_unit_producers():
        W = adapter.get(layer, path).weight.detach().double().cpu()
        sq += (W ** 2).reshape(n, rows, -1).sum(dim=(1, 2))
    W_O = adapter.get(layer, adapter.attn_consumer).weight.detach().double().cpu()
    sq += (W_O ** 2).reshape(W_O.shape[0], n, unit_dims).sum(dim=(0, 2))
    return sq.sqrt()


def neuron_weight_norms(adapter, layer):
    sq = 0
    for path in adapter.ffn_producers:
        sq = sq + (adapter.get(layer, path).weight.detach().double().cpu() ** 2).sum(dim=1)
    sq = sq + (adapter.get(layer, adapter.ffn_consumer).weight.detach().double().cpu() ** 2).sum(dim=0)
    return sq.sqrt()


@torch.no_grad()
def prune_sequential(model, adapter, inputs, attn_units, neurons, device, dense_ffn_pruners=None, sketch=None,
                     progress=True, store=None, correction="self", factor="lapack"):
    """Pass 2: prune from the bottom, each layer's IDs measured on the pruned layers below.

    With `dense_ffn_pruners` (per layer, the solved FFN pruner of pass 1), the FFN IDs come
    from the dense model instead (only the attention is re-measured), which saves the
    costliest Gram products.

    With correction 'dense', a copy of the layer inputs goes through each layer before it is
    pruned (while it is on the device, with `store` too): the dense model's activations, fed
    to the pruners beside the pruned ones with the residual stream's gap. A block that keeps
    every unit is refitted too once the layers below have changed.

    Memory: two activation-sized sets of tensors at most (three with the dense target), the
    layer's inputs and its attention outputs (and the dense stream), each batch's dropped as
    soon as it has been used for the last time.
    """
    dense = correction == "dense"
    dense_hidden = [x.clone() for x in inputs.hidden] if dense else None
    drifted = False  # whether the pruned model's activations differ from the dense model's yet
    for l, layer in each_layer(model, adapter, device, store, changes=True, desc="pass 2: prune", progress=progress):
        changes = attn_units[l] < adapter.n_attn_units(layer) or (drifted and dense)  # else: nothing to refit
        pruner = attn_pruner(adapter, layer, sketch, correction, factor=factor) if changes else None
        contexts = []
        for b, (x, extras, mask) in enumerate(zip(inputs.hidden, inputs.extras, inputs.masks)):
            contexts.append(adapter.attention_context(layer, x, extras))
            targets = {}
            if dense:  # the dense block's input and output, before the block changes
                x_dense = dense_hidden[b]
                context_dense = adapter.attention_context(layer, x_dense, extras)
                dense_hidden[b] = adapter.after_attention(layer, context_dense, x_dense)
                targets = {"A_dense": context_dense, "residual": x_dense - x} if pruner else {}
            if pruner:
                pruner.add_batch(contexts[b], mask, **targets)
        kept_dims = None
        if pruner:
            keep, W_O = pruner.solve(keep=attn_units[l]).prune(attn_units[l])
            adapter.prune_attn_units(layer, keep, W_O)
            kept_dims = expand_groups(keep, adapter.attn_unit_dims()).to(device)
            drifted = True
        del pruner
        # the kept units' outputs are unchanged by the pruning: reuse them, in place; and the
        # layer's inputs are not needed past the attention's residual: drop them, so that the
        # FFN's Gram and factor run beside one activation-sized buffer, not two
        hs = contexts
        for b, x in enumerate(inputs.hidden):
            hs[b] = adapter.after_attention(layer, hs[b] if kept_dims is None else hs[b][..., kept_dims], x)
            inputs.hidden[b] = None

        fed = dense_ffn_pruners is None  # else the FFN's IDs come from pass 1
        changes = neurons[l] < adapter.n_neurons(layer) or (drifted and dense and fed)
        pruner = None if not changes else neuron_pruner(adapter, layer, sketch, correction, factor=factor) if fed \
            else dense_ffn_pruners[l]
        for b, (h, mask) in enumerate(zip(hs, inputs.masks)):
            targets = {}
            if dense:
                h_dense = dense_hidden[b]
                hidden_dense = adapter.ffn_hidden(layer, h_dense)
                dense_hidden[b] = adapter.after_ffn(layer, hidden_dense, h_dense)
                targets = {"A_dense": hidden_dense, "residual": h_dense - h} if pruner and fed else {}
            if pruner and fed:
                pruner.add_batch(adapter.ffn_hidden(layer, h), mask, **targets)
        if pruner:
            if fed:
                pruner.solve(keep=neurons[l])
            adapter.prune_neurons(layer, *pruner.prune(neurons[l]))
            drifted = True
        del pruner

        for b, h in enumerate(hs):
            inputs.hidden[b] = adapter.after_ffn(layer, adapter.ffn_hidden(layer, h), h)
            hs[b] = None
        del contexts, hs  # one list under two names


@torch.no_grad()
def prune_from_pruners(model, adapter, attn_units, neurons, pruners_of, store=None):
    """Prune every layer from decisions taken beforehand (dense IDs, or weight norms):
    `pruners_of(index, layer)` gives a layer's (attention, FFN) pruners; a block whose pruner
    is None is left as it is."""
    for l, layer in each_layer(model, adapter, "cpu", store, changes=True, progress=False):
        attn, ffn = pruners_of(l, layer)
        if attn is not None:
            adapter.prune_attn_units(layer, *attn.prune(attn_units[l]))
        if ffn is not None:
            adapter.prune_neurons(layer, *ffn.prune(neurons[l]))


def keeps_every_head(model, adapter, allocation, costs, mu):
    """Whether the allocation keeps every attention unit whatever their prices (ffn_greedy while
    they fit in the budget): pass 1 then need not measure the attention at all."""
    if allocation != "ffn_greedy":
        return False
    attn_units, neurons = adapter.shape(model)
    attn_cost, neuron_cost = costs
    return sum(attn_units) * attn_cost <= mu * (sum(attn_units) * attn_cost + sum(neurons) * neuron_cost)


def spread_subset(items, fraction):
    """About `fraction` of the items, evenly spread (batches are often sorted by length)."""
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def stat_prune(model, adapter, batches, costs, mu, device, method="stat", allocation=None,
               calibration="sequential", weighting=None, sketch=None, score_fraction=0.25,
               neuron_share=None, progress=True, store=None, correction="self", pricing="insample",
               more_tokens=None, factor="auto", price_folds=PRICE_FOLDS, width_multiple=1, widths=None,
               search=None):
    """Prune `model` in place to at most μ of its attention and FFN MACs. Returns a PruneResult.

    costs: (MACs of one attention unit, MACs of one neuron), numbers (efficiency/macs.py).
    allocation: a name in ALLOCATORS; None: the adapter's default for its family (the one
    place that default is resolved; PruneResult.allocation says which was used). `faithful`
    is the authors' rule in its decoder variant for a decoder, its BERT variant otherwise,
    with `neuron_share` the fixed share of a layer's MACs its neurons take (None: the exact
    share of `costs`).
    score_fraction: the share of the calibration batches (evenly spread) that pass 1 scores
    the dense model on. The allocation is a coarse decision: a quarter of the data measured
    as well as all of it (docs/results.md), at a quarter of the cost; the IDs of pass 2 always
    use every batch. (one_shot, dense_ffn and ffn_then_attn prune with IDs from pass 1, so
    there pass 1 uses every batch.)
    sketch: a prune.gram.Sketch applied to every batch before its Gram products (None: exact
    Grams).
    store: a LayerStore when the layers live on disk between their turns (--low_memory).
    correction: CORRECTIONS, what each pass-2 correction reproduces ('dense' needs a
    calibration in DENSE_TARGET_CALIBRATIONS); the blocks that prune with pass 1's IDs see
    the dense model's inputs, where the two agree.
    pricing: what pass 1 prices on (PRICINGS); 'heldout' scores every batch (score_fraction
    is not used), since its prices should be those of an ID fitted on about as much data as
    pass 2's, cross-validated over `price_folds` folds of them.
    more_tokens: given the factor by which the calibration tokens should grow, the words that
    say how (a script's flag), for the CalibrationWarning raised when pass 1's Grams have
    fewer rows than a block has units.
    factor: FACTORS, who computes the pivoted Cholesky factorisations (auto: torch on a GPU,
    where the Grams then never leave it; LAPACK on the CPU); PruneResult.factor says which ran.
    width_multiple: every layer keeps a multiple of this many neurons, or all (round_neurons).
    widths: (attention units, neurons) per layer given by hand (--widths): no allocation, and no
    pass 1 where the calibration does not prune from its IDs; they must fit the budget.
    search: with allocation 'search', a prune.search.SearchSettings: the widths of its start
    allocator searched against the whole model (prune/search.py), from pass 1's IDs, before
    pass 2 prunes at them. With allocation 'measured', the same settings (not the budget): the
    start allocator's knapsack again, with each block's prices scaled to its measured KL
    (prune.search.measured_weights).
    `magnitude` never corrects.
    """
    if method not in METHODS or method == "kwon":
        raise ValueError(f"stat_prune runs stat or magnitude, not {method!r} (kwon: prune.kwon.kwon_prune)")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}: choose from {', '.join(CALIBRATIONS)}")
    allocation = allocation or adapter.default_allocation
    if allocation not in ALLOCATORS and allocation not in END_TO_END:
        raise ValueError(f"unknown allocation {allocation!r}: choose from {', '.join([*ALLOCATORS, *END_TO_END])}")
    if (allocation in END_TO_END) != (search is not None):
        raise ValueError("allocations 'search' and 'measured' need their SearchSettings, and only they")
    if allocation == "measured" and search.start not in ("greedy", "ffn_greedy"):
        raise ValueError(f"allocation 'measured' weighs a knapsack's prices (greedy, ffn_greedy), not {search.start!r}")
    problem = widths is not None and widths_problem(widths, adapter.shape(model), costs, mu)
    if problem:
        raise ValueError(f"widths: {problem}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}: choose from {', '.join(CORRECTIONS)}")
    if correction == "dense" and calibration not in DENSE_TARGET_CALIBRATIONS:
        raise ValueError(f"the dense correction target needs calibration {' or '.join(DENSE_TARGET_CALIBRATIONS)}")
    if pricing not in PRICINGS:
        raise ValueError(f"unknown pricing {pricing!r}: choose from {', '.join(PRICINGS)}")
    start = time.perf_counter()
    model.eval()
    batches = list(batches)
    factor = resolve_factor(factor, device)
    block_options = dict(sketch=sketch, factor=factor)
    keep = {"sequential": (), "dense_ffn": ("ffn",), "one_shot": ("attn", "ffn"),
            "ffn_then_attn": ("ffn",)}[calibration] if method == "stat" else ()
    if search:
        keep = ("attn", "ffn")  # the level database: every block at any width
    if pricing == "heldout" and len(batches) < 2:
        warnings.warn("held-out pricing needs at least 2 calibration batches: the prices are in-sample",
                      RuntimeWarning, stacklevel=2)
    every_batch = keep or pricing == "heldout"
    allocator = search.start if search else allocation
    scores, pruners, found, measured = [], None, None, None
    if widths is None or keep:
        inputs = capture_inputs(model, adapter, batches if every_batch else spread_subset(batches, score_fraction),
                                device)
        folds = price_folds if pricing == "heldout" else 0
        if method == "stat":
            warn_if_too_few_rows(model, adapter, fitted_rows(inputs, folds, sketch), more_tokens)
        # the search may trade attention units for neurons: it needs every block's IDs
        attn = (widths is not None or allocation == "search"
                or not keeps_every_head(model, adapter, allocator, costs, mu))
        scores, pruners = measure_dense(model, adapter, inputs, device, keep=keep, progress=progress, store=store,
                                        price_folds=folds, attn=attn, **block_options)
        del inputs
    attn_cost, neuron_cost = costs

    def allocate(weighting):
        """The allocator's widths under this depth weighting (a name, or the weights themselves)."""
        options = {}
        if allocator == "faithful":
            options = {"variant": "opt" if adapter.is_decoder else "bert", "neuron_share": neuron_share}
        units, counts = ALLOCATORS[allocator](scores, attn_cost, neuron_cost, mu, weighting, **options)
        if width_multiple > 1:
            counts = round_neurons(scores, units, counts, attn_cost, neuron_cost, mu, width_multiple, weighting)
        return units, counts

    if widths is not None:
        attn_units, neurons = (list(w) for w in widths)
    else:
        attn_units, neurons = allocate(weighting or adapter.depth_weighting)
    if search:
        if store is not None:
            raise ValueError(f"allocation {allocation!r} keeps the model in memory: "
                             "not with a LayerStore (--low_memory)")
        fitness = Fitness(model, adapter, LevelDatabase(model, adapter, pruners), search.batches, device)
        if allocation == "measured":
            kinds = ("neuron",) if keeps_every_head(model, adapter, allocator, costs, mu) else ("attn", "neuron")
            *weights, measured = measured_weights(fitness, scores, attn_units, neurons, mu, kinds, progress)
            attn_units, neurons = allocate(tuple(weights))
        else:
            found = search_widths(fitness, attn_units, neurons, search.budget_tokens, search.seed, width_multiple,
                                  progress=progress, costs=costs)
            attn_units, neurons = found.attn_units, found.neurons
        del fitness
    if method == "magnitude":
        prune_from_pruners(model, adapter, attn_units, neurons, lambda l, layer: magnitude_pruners(adapter, layer),
                           store)
    elif calibration == "one_shot":
        prune_from_pruners(model, adapter, attn_units, neurons, lambda l, layer: pruners[l], store)
    elif calibration == "ffn_then_attn":
        prune_from_pruners(model, adapter, attn_units, neurons, lambda l, layer: pruners[l], store)  # the FFNs only
        del pruners
        inputs = capture_inputs(model, adapter, batches, device)
        _, pruners = measure_dense(model, adapter, inputs, device, keep=("attn",), ffn=False, progress=progress,
                                   desc="attention Grams on the FFN-pruned model", store=store, **block_options)
        del inputs
        prune_from_pruners(model, adapter, attn_units, neurons, lambda l, layer: pruners[l], store)  # the attention
    else:
        inputs = capture_inputs(model, adapter, batches, device)
        dense_ffn_pruners = [ffn for _, ffn in pruners] if calibration == "dense_ffn" else None
        del pruners
        prune_sequential(model, adapter, inputs, attn_units, neurons, device, dense_ffn_pruners, progress=progress,
                         store=store, correction=correction, **block_options)
    return PruneResult(attn_units=list(attn_units), neurons=list(neurons), scores=scores,
                       allocation="widths" if widths is not None else allocation,
                       seconds=time.perf_counter() - start, factor=factor, search=found, measured=measured)

