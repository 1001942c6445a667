"""Kwon et al. (2022), "A Fast Post-Training Pruning Framework for Transformers" (arXiv
2204.09656), as their released code does it, on any model an adapter describes.

1. Fisher importance (their prune/fisher.py): masks of ones on every attention unit and
   neuron (prune/masks.py); for each mini-batch of a labelled sample, the gradient of the
   task loss with respect to the masks; a unit's importance is the sum over mini-batches of
   its squared gradient (the diagonal of the empirical Fisher).
2. Mask search under the MAC budget (their search_mac): heads ranked globally, neurons ranked
   globally; for every head count h the budget leaves room for n neurons; keep the (h, n)
   whose top h heads and top n neurons have the largest summed importance. Done twice: at
   the constraint μ (the student) and at √μ (the teacher of step 4).
3. Mask rearrangement (their rearrange.py): per layer, with the same count, greedily swap
   pruned and kept units to make the summed gradient of the pruned ones small over the
   mini-batches (the Fisher's off-diagonal block within a layer).
4. Mask tuning (their rescale.py; prune/mask_tuning.py): layer by layer, scales of the kept
   units solved by damped least squares so that the layer matches the teacher.
5. Here the masks become a real smaller model (prune/masks.py `prune_to_masks`).

Deviations from their code, each for a reason stated where it is made:
- the search never keeps more heads than the budget pays for (theirs could, with no neurons
  left, exceed it), and takes the first best candidate even when every importance is zero
  (theirs then has no mask and fails); the neuron count is floored with a 1e-9 allowance, as
  prune/allocation.py does, so that an exact budget does not lose a neuron to rounding;
- rearrangement starts from the searched mask's pruned units (theirs from the lowest Fisher
  values of the layer: the same units, unless two values tie exactly);
- gradients, Fisher sums and normal equations in float64, LSMR on the CPU (theirs float32,
  cupy);
- a 1 × 1 tuning system (one neuron kept) is solved as their closed form says (theirs then
  fails on a missing LSMR status), and a non-finite scale stops tuning like an out-of-range one;
- the mini-batches are 32 (GLUE) or 12 (SQuAD) for every model (theirs halves them for
  models named *large*, for GPU memory);
- units are masked at the consumers' inputs rather than through `head_mask` (gone from
  transformers), which scales each head's output the same way;
- the MAC costs are the repository's (efficiency/macs.py, the same formula as theirs, per
  model family); the result is a smaller model, theirs masks.
"""
import math
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from prerequisites.layerwise import capture_inputs
from prune.mask_tuning import tune_masks
from prune.masks import UnitMasks, masks_applied, prune_to_masks
from prune.stat import PruneResult

# the targets of the task loss in a batch (Hugging Face's names): kept out of the layer-by-layer runs
LABEL_KEYS = ("labels", "start_positions", "end_positions")


# ---------------------------------------------------------------------------------------------
# 1. Importance


def mask_gradients(model, adapter, batches, device, progress=True):
    """Per mini-batch gradients of the task loss with respect to all-ones masks.

    Returns (attention, neurons): per layer, a float64 CPU tensor (mini-batches × units).
    The batches carry their labels (the model computes its own loss from them). The model's
    parameters are frozen meanwhile: only the masks require grad.
    """
    masks = UnitMasks.ones(model, adapter, device=device)
    leaves = masks.attn + masks.neurons
    for mask in leaves:
        mask.requires_grad_(True)
    grads = [[] for _ in leaves]
    trainable = [p.requires_grad for p in model.parameters()]
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad(), masks_applied(model, adapter, masks):
            for batch in tqdm(batches, desc="kwon: mask gradients", disable=not progress):
                out = model(**{k: v.to(device) for k, v in batch.items()})
                if out.loss is None:
                    raise ValueError("the batches carry no labels: the importance is the gradient of the task loss")
                for g, mask_grad in zip(grads, torch.autograd.grad(out.loss, leaves, allow_unused=True)):
                    g.append(torch.zeros(0) if mask_grad is None else mask_grad.detach().double().cpu())
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
    stacked = [torch.stack(g) if g and g[0].numel() else torch.zeros(len(g), 0, dtype=torch.float64) for g in grads]
    L = len(masks.attn)
    return stacked[:L], stacked[L:]


def fisher(grads):
    """Importance of every unit of one layer: Σ over mini-batches of the squared gradient."""
    return (grads ** 2).sum(dim=0)


# ---------------------------------------------------------------------------------------------
# 2. Search


def search_mac(attn_importance, neuron_importance, attn_cost, neuron_cost, budget):
    """The best global (h, n) under `budget` MACs, as their search_mac chooses it.

    attn_importance, neuron_importance: per layer, 1-D arrays. Returns (kept attention units,
    kept neurons): per layer, boolean arrays.

    For h = 1, 2, ... heads (the h most important anywhere), n = ⌊(budget − h·attn_cost) /
    neuron_cost⌋ neurons (the n most important anywhere); the first (h, n) with the largest
    summed importance wins. Only head counts the budget pays for are tried (theirs went on to
    all heads, with n = 0, which can exceed the budget); h = 0 only when not even one head fits.
    """
    attn_values = np.concatenate([np.asarray(a, dtype=np.float64) for a in attn_importance])
    neuron_values = np.concatenate([np.asarray(n, dtype=np.float64) for n in neuron_importance])
    attn_order = np.argsort(-attn_values, kind="stable")
    neuron_order = np.argsort(-neuron_values, kind="stable")
    attn_top = np.concatenate([[0.0], np.cumsum(attn_values[attn_order])])  # [h]: sum of the best h
    neuron_top = np.concatenate([[0.0], np.cumsum(neuron_values[neuron_order])])

    candidates = [h for h in range(1, len(attn_values) + 1) if h * attn_cost <= budget] or [0]
    best = None
    for h in candidates:
        # + 1e-9: a budget that pays exactly for n neurons must not lose one to rounding (as in
        # prune/allocation.py)
        n = min(max(int((budget - h * attn_cost) / neuron_cost + 1e-9), 0), len(neuron_values))
        total = attn_top[h] + neuron_top[n]
        if best is None or total > best[0]:
            best = (total, h, n)
    _, h, n = best
    return (_split_keep(attn_order[:h], [len(a) for a in attn_importance]),
            _split_keep(neuron_order[:n], [len(x) for x in neuron_importance]))


def _split_keep(flat_kept, sizes):
    keep = np.zeros(sum(sizes), dtype=bool)
    keep[flat_kept] = True
    return np.split(keep, np.cumsum(sizes)[:-1])


# ---------------------------------------------------------------------------------------------
# 3. Rearrangement


def rearrangement_objective(keep, grads):
    """‖Σ_pruned g‖² summed over mini-batches: grads (mini-batches × units) of one layer."""
    keep = torch.as_tensor(np.asarray(keep, dtype=bool))
    return float((grads[:, ~keep].sum(dim=1) ** 2).sum())


def rearrange(keep, grads):
    """One layer's kept units after their greedy rearrangement (the count is unchanged).

    The pruned set starts as the mask's pruned units; the kept units are offered one at a
    time, least important (Fisher) first: each joins the pruned set, and the member of the
    set whose removal leaves the smallest ‖Σ_set g‖² (summed over mini-batches) leaves it.
    Each step can only lower the objective (removing the newcomer restores the previous set).
    """
    keep = np.asarray(keep, dtype=bool)
    n_pruned = int((~keep).sum())
    if n_pruned == 0 or n_pruned == len(keep):
        return keep.copy()
    g = grads.T.contiguous()  # units × mini-batches
    ascending = np.argsort(fisher(grads).numpy(), kind="stable")
    pruned = [int(i) for i in ascending if not keep[i]]
    for candidate in (int(i) for i in ascending if keep[i]):
        pruned.append(candidate)
        vectors = g[pruned]
        without_each = vectors.sum(dim=0, keepdim=True) - vectors
        del pruned[int((without_each ** 2).sum(dim=1).argmin())]
    new_keep = np.ones(len(keep), dtype=bool)
    new_keep[pruned] = False
    return new_keep


# ---------------------------------------------------------------------------------------------
# The pipeline


def kwon_prune(model, adapter, batches, costs, mu, device, classification=False, progress=True):
    """Prune `model` in place to at most μ of its attention and FFN MACs, as Kwon et al. do.

    batches: the labelled sample's mini-batches (model inputs and the task loss's targets).
    costs: (MACs of one attention unit, MACs of one neuron), numbers (efficiency/macs.py).
    classification: the last layer's FFN is tuned on each sequence's first token only (the
    one a classifier's head reads), as their code does for GLUE.
    Returns a PruneResult (`scores` empty: the importances are not ID scores).
    """
    start = time.perf_counter()
    model.eval()
    batches = list(batches)
    attn_grads, neuron_grads = mask_gradients(model, adapter, batches, device, progress)
    attn_importance = [fisher(g).numpy() for g in attn_grads]
    neuron_importance = [fisher(g).numpy() for g in neuron_grads]

    attn_cost, neuron_cost = costs
    units, neurons = adapter.shape(model)
    dense = sum(units) * attn_cost + sum(neurons) * neuron_cost
    like = UnitMasks.ones(model, adapter, device=device)
    teacher = UnitMasks.from_keep(*search_mac(attn_importance, neuron_importance, attn_cost, neuron_cost,
                                              math.sqrt(mu) * dense), like)
    attn_keep, neuron_keep = search_mac(attn_importance, neuron_importance, attn_cost, neuron_cost, mu * dense)
    student = UnitMasks.from_keep([rearrange(k, g) for k, g in zip(attn_keep, attn_grads)],
                                  [rearrange(k, g) for k, g in zip(neuron_keep, neuron_grads)], like)

    inputs = capture_inputs(model, adapter, [{k: v for k, v in b.items() if k not in LABEL_KEYS} for b in batches],
                            device)
    tuned, stopped_at = tune_masks(model, adapter, inputs, teacher, student, device,
                                   classification=classification, progress=progress)
    del inputs
    if stopped_at is not None:  # their code says nothing; a researcher comparing methods wants to know
        print(f"kwon: mask tuning stopped at layer {stopped_at} (solver failure or a scale outside [-10, 10]); "
              f"the layers from there on keep their masks untuned", file=sys.stderr)
    prune_to_masks(model, adapter, student, tuned)
    attn_units, neuron_counts = adapter.shape(model)
    return PruneResult(attn_units=attn_units, neurons=neuron_counts, allocation="fisher",
                       seconds=time.perf_counter() - start)
