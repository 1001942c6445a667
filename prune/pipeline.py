"""The STAT pipeline (DESIGN.md §4), layer by layer, for any model an adapter describes.

1. Capture the inputs of the first layer for every calibration batch.
2. Pass 1, on the dense model: run the layers one at a time over all batches, accumulating
   each layer's Gram matrices, and score its heads and neurons; allocate the budget.
3. Pass 2, from the bottom: for each layer, recompute its Grams on the outputs of the already
   pruned layers below it, so that each correction sees the error that reaches it; prune the
   heads, then (with the pruned attention in place) the neurons.

Only one layer and the calibration activations are on the device at a time, which is what
lets a large model prune on one GPU. Inside a layer the activations at the two cut points are
reused: the kept heads' outputs do not change when other heads go, so the attention is run
once per batch.
"""
import inspect
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from prune.allocation import ALLOCATORS, LayerScores
from prune.gram import Gram
from prune.interpolative import expand_groups
from prune.units import magnitude_units, stat_heads, stat_neurons

METHODS = ("stat", "magnitude")
# sequential: both IDs of a layer measured on the pruned layers below it (DESIGN.md §4);
# dense_ffn: only the head IDs re-measured, the FFN IDs from the dense model;
# one_shot: every ID from the dense model.
CALIBRATIONS = ("sequential", "dense_ffn", "one_shot")


@dataclass
class Calibration:
    """The inputs of the current layer for every calibration batch."""

    hidden: list  # (B, S, d) per batch
    extras: list  # the layer's other arguments per batch (attention mask, positions)
    masks: list  # (B, S) bool per batch, True for real tokens; None when there is no padding


@dataclass
class PruneResult:
    heads: list
    neurons: list
    scores: list = field(default_factory=list)
    seconds: float = 0.0


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model, adapter, batches, device):
    """Run each batch up to the first layer and keep what that layer receives.

    `batches` yields dicts of model inputs (input_ids, attention_mask, ...).
    """
    first = adapter.layers(model)[0]
    params = list(inspect.signature(first.forward).parameters)
    hidden, extras, masks = [], [], []

    def hook(_module, args, kwargs):
        bound = dict(zip(params, args))
        bound.update(kwargs)
        hidden.append(bound.pop(params[0]))
        bound.pop("past_key_values", None)
        extras.append(bound)
        raise _Stop

    moved = move_to(adapter.pre_layer_modules(model), device)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            mask = batch.get("attention_mask")
            masks.append(mask.bool() if mask is not None and not bool(mask.all()) else None)
            try:
                model(**batch, **adapter.capture_kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
        restore(moved)
    return Calibration(hidden, extras, masks)


def move_to(modules, device):
    moved = []
    for m in modules:
        p = next(m.parameters(), None)
        if p is None:
            p = next(m.buffers(), None)
        if p is not None and p.device != torch.device(device):
            moved.append((m, p.device))
            m.to(device)
    return moved


def restore(moved):
    for m, dev in moved:
        m.to(dev)


def layer_scores(adapter, layer, G_heads, G_ffn):
    unit_dims = adapter.unit_dims()
    W_O = adapter.get(layer, adapter.head_consumer).weight
    W_out = adapter.get(layer, adapter.ffn_consumer).weight
    _, head_factor = stat_heads(G_heads, W_O, unit_dims)
    _, neuron_factor = stat_neurons(G_ffn, W_out)
    return LayerScores(
        head_errors=head_factor.output_errors(W_O)[::unit_dims].cpu().numpy(),
        neuron_pivots=neuron_factor.pivots().cpu().numpy(),
        neuron_errors=neuron_factor.errors().cpu().numpy(),
    )


@torch.no_grad()
def measure_dense(model, adapter, calib, device, keep_grams=False, sketch_rows=None, progress=True):
    """Pass 1: every layer's Grams on the dense model, and the scores they give."""
    scores, grams = [], []
    layers = adapter.layers(model)
    for layer in tqdm(layers, desc="pass 1: dense Grams", disable=not progress):
        moved = move_to([layer], device)
        G_heads = Gram(adapter.n_units(layer) * adapter.unit_dims(), device, sketch_rows)
        G_ffn = Gram(adapter.n_neurons(layer), device, sketch_rows)
        for b, (x, extras, mask) in enumerate(zip(calib.hidden, calib.extras, calib.masks)):
            context = adapter.attention_context(layer, x, extras)
            G_heads.add_batch(context, mask)
            h = adapter.after_attention(layer, context, x)
            hidden = adapter.ffn_hidden(layer, h)
            G_ffn.add_batch(hidden, mask)
            calib.hidden[b] = adapter.after_ffn(layer, hidden, h)
        scores.append(layer_scores(adapter, layer, G_heads.G, G_ffn.G))
        if keep_grams:
            grams.append((G_heads.G.cpu(), G_ffn.G.cpu()))
        restore(moved)
    return scores, grams


def _head_block(adapter, layer, method, G=None):
    W_O = adapter.get(layer, adapter.head_consumer).weight
    if method == "magnitude":
        return magnitude_units(W_O, head_weight_norms(adapter, layer), adapter.unit_dims())
    return stat_heads(G, W_O, adapter.unit_dims())[0]


def _neuron_block(adapter, layer, method, G=None):
    W_out = adapter.get(layer, adapter.ffn_consumer).weight
    if method == "magnitude":
        return magnitude_units(W_out, neuron_weight_norms(adapter, layer))
    return stat_neurons(G, W_out)[0]


def head_weight_norms(adapter, layer):
    """Norm of all the weights that belong to each unit (its Q, K, V rows and O columns)."""
    n, unit_dims = adapter.n_units(layer), adapter.unit_dims()
    sq = torch.zeros(n, dtype=torch.float64)
    for path, rows in adapter.head_producers():
        W = adapter.get(layer, path).weight.detach().double().cpu()
        sq += (W ** 2).reshape(n, rows, -1).sum(dim=(1, 2))
    W_O = adapter.get(layer, adapter.head_consumer).weight.detach().double().cpu()
    sq += (W_O ** 2).reshape(W_O.shape[0], n, unit_dims).sum(dim=(0, 2))
    return sq.sqrt()


def neuron_weight_norms(adapter, layer):
    sq = 0
    for path in adapter.ffn_producers:
        sq = sq + (adapter.get(layer, path).weight.detach().double().cpu() ** 2).sum(dim=1)
    sq = sq + (adapter.get(layer, adapter.ffn_consumer).weight.detach().double().cpu() ** 2).sum(dim=0)
    return sq.sqrt()


def _gram(activations, masks, n, device, sketch_rows):
    G = Gram(n, device, sketch_rows)
    for A, mask in zip(activations, masks):
        G.add_batch(A, mask)
    return G.G


@torch.no_grad()
def prune_sequential(model, adapter, calib, heads, neurons, device, dense_grams=None, sketch_rows=None,
                     progress=True):
    """Pass 2: prune from the bottom, each layer's IDs measured on the pruned layers below.

    With `dense_grams`, the FFN IDs come from the dense model's Grams instead (only the heads
    are re-measured), which saves the costliest Gram products.
    """
    layers = adapter.layers(model)
    for l, layer in enumerate(tqdm(layers, desc="pass 2: prune", disable=not progress)):
        moved = move_to([layer], device)
        contexts = [adapter.attention_context(layer, x, extras) for x, extras in zip(calib.hidden, calib.extras)]
        G_heads = _gram(contexts, calib.masks, adapter.n_units(layer) * adapter.unit_dims(), device, sketch_rows)
        keep, W_O = _head_block(adapter, layer, "stat", G_heads).prune(heads[l])
        adapter.prune_heads(layer, keep, W_O)
        kept_dims = expand_groups(keep, adapter.unit_dims()).to(device)
        # the kept heads' outputs are unchanged by the pruning: reuse them
        hs = [adapter.after_attention(layer, c[..., kept_dims], x) for c, x in zip(contexts, calib.hidden)]
        del contexts

        if dense_grams is None:
            G_ffn = _gram((adapter.ffn_hidden(layer, h) for h in hs), calib.masks, adapter.n_neurons(layer),
                          device, sketch_rows)
        else:
            G_ffn = dense_grams[l][1].to(device)
        keep, W_out = _neuron_block(adapter, layer, "stat", G_ffn).prune(neurons[l])
        adapter.prune_neurons(layer, keep, W_out)
        del G_ffn

        for b, h in enumerate(hs):
            calib.hidden[b] = adapter.after_ffn(layer, adapter.ffn_hidden(layer, h), h)
        del hs
        restore(moved)


@torch.no_grad()
def prune_from_grams(model, adapter, heads, neurons, method, grams=None):
    """Prune every layer at once: by weight norms (magnitude), or by the dense Grams (one-shot)."""
    for l, layer in enumerate(adapter.layers(model)):
        G_heads, G_ffn = grams[l] if grams else (None, None)
        keep, W_O = _head_block(adapter, layer, method, G_heads).prune(heads[l])
        adapter.prune_heads(layer, keep, W_O)
        keep, W_out = _neuron_block(adapter, layer, method, G_ffn).prune(neurons[l])
        adapter.prune_neurons(layer, keep, W_out)


def spread_subset(items, count):
    """`count` items evenly spaced over the list (all of them when count is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    picks = torch.linspace(0, len(items) - 1, max(count, 1)).round().long().unique()
    return [items[i] for i in picks.tolist()]


def stat_prune(model, adapter, batches, costs, mu, device, method="stat", allocation="greedy",
               calibration="sequential", weighting=None, sketch_rows=None, score_batches=None, progress=True):
    """Prune `model` in place to at most μ of its attention and FFN MACs. Returns a PruneResult.

    score_batches: how many of the calibration batches (evenly spaced) pass 1 scores the dense
    model on; the allocation is a coarse decision that needs fewer tokens than the IDs of
    pass 2, which always use every batch. None: all of them.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}: choose from {', '.join(CALIBRATIONS)}")
    if allocation not in ALLOCATORS:
        raise ValueError(f"unknown allocation {allocation!r}: choose from {', '.join(ALLOCATORS)}")
    start = time.perf_counter()
    model.eval()
    batches = list(batches)
    keep_grams = method == "stat" and calibration != "sequential"
    calib = capture_inputs(model, adapter, batches if keep_grams else spread_subset(batches, score_batches), device)
    scores, grams = measure_dense(model, adapter, calib, device, keep_grams=keep_grams,
                                  sketch_rows=sketch_rows, progress=progress)
    heads, neurons = ALLOCATORS[allocation](scores, costs, mu, weighting or adapter.depth_weighting)
    if method == "stat" and calibration != "one_shot":
        calib = capture_inputs(model, adapter, batches, device)
        prune_sequential(model, adapter, calib, heads, neurons, device,
                         grams if calibration == "dense_ffn" else None, sketch_rows, progress)
    else:
        prune_from_grams(model, adapter, heads, neurons, method, grams if keep_grams else None)
    return PruneResult(heads=list(heads), neurons=list(neurons), scores=scores,
                       seconds=time.perf_counter() - start)
