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
import ctypes
import inspect
import time
from dataclasses import dataclass, field

import numpy as np
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
    allocation: str = ""
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
    """Put back the modules move_to moved, and hand the layer's freed memory back."""
    for m, dev in moved:
        m.to(dev)
    release_memory()


def release_memory():
    """Freed activations are not always returned to the system: on a GPU the caching
    allocator keeps them, and glibc's malloc keeps the holes that many large temporaries of
    different sizes leave (on SmolLM2 the process grew by ~0.5 GB over 30 layers without
    this). Called between layers, so that the peak is that of one layer. (No gc.collect():
    tensors are freed by reference counting, and a full collection costs ~0.1 s each time.)"""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl): nothing to trim
        return None


_LIBC = _glibc()


def run_layer(layer, calib):
    """Replace every batch's hidden states by the layer's outputs (the next layer's inputs)."""
    for b, (x, extras) in enumerate(zip(calib.hidden, calib.extras)):
        out = layer(x, **extras)
        calib.hidden[b] = out[0] if isinstance(out, tuple) else out


def dense_blocks(adapter, layer, G_heads, G_ffn):
    """The STAT blocks of one dense layer and their scores (an empty block has None, and
    scores as nothing to keep)."""
    unit_dims = adapter.unit_dims()
    W_O = adapter.get(layer, adapter.head_consumer).weight
    W_out = adapter.get(layer, adapter.ffn_consumer).weight
    head_block = neuron_block = None
    head_errors, neuron_pivots, neuron_errors = np.zeros(1), np.zeros(0), np.zeros(1)
    if G_heads.shape[0]:
        head_block, head_factor = stat_heads(G_heads, W_O, unit_dims)
        head_errors = head_factor.output_errors(W_O)[::unit_dims].cpu().numpy()
    if G_ffn.shape[0]:
        neuron_block, neuron_factor = stat_neurons(G_ffn, W_out)
        neuron_pivots, neuron_errors = neuron_factor.pivots().cpu().numpy(), neuron_factor.errors().cpu().numpy()
    return LayerScores(head_errors, neuron_pivots, neuron_errors), (head_block, neuron_block)


@torch.no_grad()
def measure_dense(model, adapter, calib, device, keep_blocks=False, sketch_rows=None, progress=True):
    """Pass 1: every layer's Grams on the dense model, and the scores they give (and, when
    asked, the blocks themselves, to prune from the dense model's IDs)."""
    scores, blocks = [], []
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
        layer_scores, layer_blocks = dense_blocks(adapter, layer, G_heads.G, G_ffn.G)
        scores.append(layer_scores)
        if keep_blocks:  # off the device: only the layer being worked on may be there
            blocks.append(tuple(block and block.to("cpu") for block in layer_blocks))
        restore(moved)
    return scores, blocks


def magnitude_blocks(adapter, layer):
    head_block = neuron_block = None
    if adapter.n_units(layer):
        head_block = magnitude_units(adapter.get(layer, adapter.head_consumer).weight,
                                     head_weight_norms(adapter, layer), adapter.unit_dims())
    if adapter.n_neurons(layer):
        neuron_block = magnitude_units(adapter.get(layer, adapter.ffn_consumer).weight,
                                       neuron_weight_norms(adapter, layer))
    return head_block, neuron_block


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
def prune_sequential(model, adapter, calib, heads, neurons, device, dense_blocks=None, sketch_rows=None,
                     progress=True):
    """Pass 2: prune from the bottom, each layer's IDs measured on the pruned layers below.

    With `dense_blocks`, the FFN IDs come from the dense model instead (only the heads are
    re-measured), which saves the costliest Gram products.

    Memory: two activation-sized sets of tensors at most, the layer's inputs and its
    attention outputs, each batch's dropped as soon as it has been used for the last time.
    """
    layers = adapter.layers(model)
    for l, layer in enumerate(tqdm(layers, desc="pass 2: prune", disable=not progress)):
        moved = move_to([layer], device)
        contexts = [adapter.attention_context(layer, x, extras) for x, extras in zip(calib.hidden, calib.extras)]
        kept_dims = torch.zeros(0, dtype=torch.long, device=device)
        if adapter.n_units(layer):
            G_heads = _gram(contexts, calib.masks, adapter.n_units(layer) * adapter.unit_dims(), device, sketch_rows)
            W_O = adapter.get(layer, adapter.head_consumer).weight
            keep, W_O = stat_heads(G_heads, W_O, adapter.unit_dims())[0].prune(heads[l])
            adapter.prune_heads(layer, keep, W_O)
            kept_dims = expand_groups(keep, adapter.unit_dims()).to(device)
        # the kept heads' outputs are unchanged by the pruning: reuse them, in place; and the
        # layer's inputs are not needed past the attention's residual: drop them, so that the
        # FFN's Gram and factor run beside one activation-sized buffer, not two
        hs = contexts
        for b, x in enumerate(calib.hidden):
            hs[b] = adapter.after_attention(layer, hs[b][..., kept_dims], x)
            calib.hidden[b] = None

        if adapter.n_neurons(layer):
            if dense_blocks is None:
                G_ffn = _gram((adapter.ffn_hidden(layer, h) for h in hs), calib.masks, adapter.n_neurons(layer),
                              device, sketch_rows)
                block = stat_neurons(G_ffn, adapter.get(layer, adapter.ffn_consumer).weight)[0]
                del G_ffn  # the block holds its factor; the Gram is not needed while it prunes
            else:
                block = dense_blocks[l][1]
            adapter.prune_neurons(layer, *block.prune(neurons[l]))

        for b, h in enumerate(hs):
            calib.hidden[b] = adapter.after_ffn(layer, adapter.ffn_hidden(layer, h), h)
            hs[b] = None
        del contexts, hs  # one list under two names
        restore(moved)


@torch.no_grad()
def prune_from_blocks(model, adapter, heads, neurons, blocks):
    """Prune every layer at once from blocks decided beforehand (dense IDs, or weight norms)."""
    for l, layer in enumerate(adapter.layers(model)):
        head_block, neuron_block = blocks[l]
        if head_block is not None:
            adapter.prune_heads(layer, *head_block.prune(heads[l]))
        if neuron_block is not None:
            adapter.prune_neurons(layer, *neuron_block.prune(neurons[l]))


def spread_subset(items, fraction):
    """About `fraction` of the items, evenly spread (batches are often sorted by length)."""
    count = max(1, round(fraction * len(items)))
    if count >= len(items):
        return list(items)
    return [items[int((i + 0.5) * len(items) / count)] for i in range(count)]


def stat_prune(model, adapter, batches, costs, mu, device, method="stat", allocation=None,
               calibration="sequential", weighting=None, sketch_rows=None, score_fraction=0.25, progress=True):
    """Prune `model` in place to at most μ of its attention and FFN MACs. Returns a PruneResult.

    allocation: a name in ALLOCATORS; None: the adapter's default for its family.
    score_fraction: the share of the calibration batches (evenly spread) that pass 1 scores
    the dense model on. The allocation is a coarse decision: a quarter of the data measured
    as well as all of it (README), at a quarter of the cost; the IDs of pass 2 always use
    every batch. (one_shot and dense_ffn prune with IDs from pass 1, so there pass 1 uses
    every batch.)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}: choose from {', '.join(CALIBRATIONS)}")
    allocation = allocation or adapter.default_allocation
    if allocation not in ALLOCATORS:
        raise ValueError(f"unknown allocation {allocation!r}: choose from {', '.join(ALLOCATORS)}")
    start = time.perf_counter()
    model.eval()
    batches = list(batches)
    keep_blocks = method == "stat" and calibration != "sequential"
    calib = capture_inputs(model, adapter, batches if keep_blocks else spread_subset(batches, score_fraction), device)
    scores, blocks = measure_dense(model, adapter, calib, device, keep_blocks=keep_blocks,
                                   sketch_rows=sketch_rows, progress=progress)
    del calib
    heads, neurons = ALLOCATORS[allocation](scores, costs, mu, weighting or adapter.depth_weighting)
    if method == "magnitude":
        prune_from_blocks(model, adapter, heads, neurons, [magnitude_blocks(adapter, l) for l in adapter.layers(model)])
    elif calibration == "one_shot":
        prune_from_blocks(model, adapter, heads, neurons, blocks)
    else:
        calib = capture_inputs(model, adapter, batches, device)
        prune_sequential(model, adapter, calib, heads, neurons, device,
                         blocks if calibration == "dense_ffn" else None, sketch_rows, progress)
    return PruneResult(heads=list(heads), neurons=list(neurons), scores=scores, allocation=allocation,
                       seconds=time.perf_counter() - start)
