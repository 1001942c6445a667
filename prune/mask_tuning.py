"""Kwon et al.'s mask tuning (their prune/rescale.py), layer by layer from the bottom.

Two copies of the calibration activations travel up the layers: the teacher's, masked at the
milder constraint √μ (their pruning schedule's first step), and the student's, masked at μ
with the scales tuned so far. In layer ℓ:
- attention (not in layer 0): the scales s of the kept units and a constant c minimise
  ‖Σ_u s_u·(x_u W_O,uᵀ) + c − (teacher's sum − bias − student's residual)‖² over the real
  tokens' outputs, where x_u is the student's output of unit u and the teacher's sum is
  W_O (teacher's context) + bias + teacher's residual, the residual sum before the layer
  norm; c is discarded;
- FFN: the same with the kept neurons' outputs h_j·W_2[:, j] and no constant. The teacher's
  sum there is its FFN output with *every* neuron of this layer: their hook that reads the
  FFN's input is registered before the one that masks it, so it sees the unmasked
  activations (the teacher's neuron mask acts only on what it passes to the next layer).
  Done here as their code does it; for a classifier the last layer is fitted on each
  sequence's first token only (the one the head reads).
Each system is solved in its normal-equations form by `damped_lsmr`. If the solver reports
failure or a scale leaves [−10, 10], tuning stops there: this layer's remaining block and
every layer above keep their masks as they are.
"""
import numpy as np
import torch
from scipy.sparse.linalg import lsmr
from tqdm.auto import tqdm

from prerequisites.layerwise import move_to, restore

SCALE_LIMIT = 10.0


def damped_lsmr(ATA, ATB, damp=1.0):
    """Their solver: s = 1 + x, x = LSMR(ATA, ATB − ATA·1, damp); so s minimises
    ‖ATA s − ATB‖² + damp²‖s − 1‖² (the stacked system [ATA; damp·I] s = [ATB; damp·1]),
    regularised towards 1. LSMR as cupy's (theirs) runs by default: atol = btol = 1e-6,
    condition limit 1e8, and at most 5n iterations (cupy's default; scipy's is n, after which
    a system this small often reports the iteration limit, a failure, before converging).

    Returns (s, ok); ok is False when LSMR stops on the condition or iteration limit (istop ≥ 3).
    A 1 × 1 system is solved undamped, s = ATB / ATA, as their code does (it has no LSMR status
    there; theirs then fails on the missing status, here it is ok when ATA ≠ 0).
    """
    ATA = np.asarray(ATA, dtype=np.float64)
    ATB = np.asarray(ATB, dtype=np.float64)
    if ATB.shape[0] == 1:
        if ATA[0, 0] == 0:
            return np.full(1, np.nan), False
        return ATB / ATA[0], True
    x, istop = lsmr(ATA, ATB - ATA.sum(axis=1), damp=damp, maxiter=5 * len(ATB))[:2]
    return x + 1.0, bool(istop < 3)


def _rows(t, mask, first_token=False):
    """The rows of (batch, seq, n) activations that count: the real tokens' (padding
    excluded), or each sequence's first token's."""
    if first_token:
        return t[:, 0]
    if mask is not None:
        t = t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1])


def _usable(scales, ok):
    return ok and np.isfinite(scales).all() and scales.max() <= SCALE_LIMIT and scales.min() >= -SCALE_LIMIT


@torch.no_grad()
def tune_masks(model, adapter, inputs, teacher, student, device, classification=False, solver=damped_lsmr,
               progress=True):
    """The student's masks with tuned scales; returns (tuned UnitMasks, the layer where tuning
    stopped, or None).

    inputs: the first layer's inputs (prerequisites/layerwise.py), consumed. teacher, student:
    0/1 UnitMasks; solver(ATA, ATB) -> (scales, ok).
    """
    tuned = student.clone()
    layers = adapter.layers(model)
    unit_dims = adapter.attn_unit_dims()
    teacher_x = [x.clone() for x in inputs.hidden]
    student_x = inputs.hidden
    for l, layer in enumerate(tqdm(layers, desc="kwon: mask tuning", disable=not progress)):
        moved = move_to([layer], device)
        try:
            if not _tune_layer(adapter, layer, l, l == len(layers) - 1, teacher, tuned, teacher_x, student_x,
                               inputs, unit_dims, classification, solver):
                return tuned, l
        finally:
            restore(moved)
    return tuned, None


def _tune_layer(adapter, layer, l, last, teacher, tuned, teacher_x, student_x, inputs, unit_dims, classification,
                solver):
    """Tune one layer's scales in `tuned` and move both sets of activations past the layer;
    False when tuning must stop."""
    W_O = adapter.get(layer, adapter.attn_consumer).weight
    teacher_dims = teacher.attn_dims(l, unit_dims).to(W_O.device)

    # attention: every batch's contexts, the teacher's masked, the student's as they come
    kept = torch.nonzero(tuned.attn[l]).flatten()
    equations = _AttentionEquations(W_O, kept.cpu(), unit_dims) if l > 0 and len(kept) else None
    teacher_ctx, student_ctx = [], []
    for b, extras in enumerate(inputs.extras):
        t_ctx = adapter.attention_context(layer, teacher_x[b], extras) * teacher_dims
        s_ctx = adapter.attention_context(layer, student_x[b], extras)
        if equations:
            equations.add_batch(_rows(s_ctx, inputs.masks[b]), _rows(student_x[b], inputs.masks[b]),
                                _rows(t_ctx @ W_O.T + teacher_x[b], inputs.masks[b]))
        teacher_ctx.append(t_ctx)
        student_ctx.append(s_ctx)
    if equations:
        scales, ok = solver(*equations.system())
        scales = scales[:-1]  # the constant's coefficient is discarded
        if not _usable(scales, ok):
            return False
        tuned.attn[l][kept] *= torch.as_tensor(scales, dtype=tuned.attn[l].dtype, device=tuned.attn[l].device)

    # FFN: the teacher's activations go through the whole layer now (its masks are fixed); the
    # student's reach the FFN's input, and pass its output once the scales are known
    student_dims = tuned.attn_dims(l, unit_dims).to(W_O.device)
    W_2 = adapter.get(layer, adapter.ffn_consumer).weight
    kept = torch.nonzero(tuned.neurons[l]).flatten()
    equations = _NeuronEquations(W_2, kept.to(W_2.device)) if len(kept) else None
    first_token = classification and last
    for b in range(len(teacher_x)):
        t_h = adapter.after_attention(layer, teacher_ctx[b], teacher_x[b])
        student_x[b] = adapter.after_attention(layer, student_ctx[b] * student_dims, student_x[b])
        teacher_ctx[b] = student_ctx[b] = None
        t_hidden = adapter.ffn_hidden(layer, t_h)
        if equations:
            mask = inputs.masks[b]
            equations.add_batch(_rows(adapter.ffn_hidden(layer, student_x[b]), mask, first_token),
                                _rows(student_x[b], mask, first_token),
                                _rows(t_hidden @ W_2.T + t_h, mask, first_token))  # unmasked: see the docstring
        teacher_x[b] = adapter.after_ffn(layer, t_hidden * teacher.neurons[l].to(t_hidden.dtype), t_h)
    if equations:
        scales, ok = solver(*equations.system())
        if not _usable(scales, ok):
            return False
        tuned.neurons[l][kept] *= torch.as_tensor(scales, dtype=tuned.neurons[l].dtype,
                                                  device=tuned.neurons[l].device)
    for b, h in enumerate(student_x):
        student_x[b] = adapter.after_ffn(layer, adapter.ffn_hidden(layer, h) * tuned.neurons[l].to(h.dtype), h)
    return True


class _AttentionEquations:
    """Normal equations of the attention's scales and a constant, accumulated over batches.

    Column u of the system is unit u's contribution to the block's output, x_u W_O,uᵀ,
    flattened over tokens and output dims; the last column is all ones (the constant). The
    target is the teacher's residual sum less the bias and the student's residual, so the
    bias (unchanged by scaling) drops out.
    """

    def __init__(self, W_O, kept, unit_dims):
        self.W = W_O.detach().double().reshape(W_O.shape[0], -1, unit_dims)[:, kept.to(W_O.device)]  # (d, k, dims)
        self.kept, self.unit_dims = kept, unit_dims
        k = len(kept)
        self.ATA = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=W_O.device)
        self.ATB = torch.zeros(k + 1, dtype=torch.float64, device=W_O.device)

    def add_batch(self, contexts, residual, target):
        """contexts (N, units·dims): the student's; residual (N, d): the student's block input;
        target (N, d): the teacher's residual sum without the bias."""
        N = contexts.shape[0]
        x = contexts.double().reshape(N, -1, self.unit_dims)[:, self.kept.to(contexts.device)]  # (N, k, dims)
        outputs = torch.einsum("nkh,dkh->knd", x, self.W).reshape(len(self.kept), -1)  # (k, N·d)
        b = (target.double() - residual.double()).reshape(-1)
        k = len(self.kept)
        self.ATA[:k, :k] += outputs @ outputs.T
        column = outputs.sum(dim=1)
        self.ATA[:k, k] += column
        self.ATA[k, :k] += column
        self.ATA[k, k] += outputs.shape[1]
        self.ATB[:k] += outputs @ b
        self.ATB[k] += b.sum()

    def system(self):
        return self.ATA.cpu().numpy(), self.ATB.cpu().numpy()


class _NeuronEquations:
    """Normal equations of the neurons' scales: column j of the system is h_j W_2[:, j]ᵀ over
    tokens and output dims, so AᵀA = (W_2ᵀW_2) ∘ (HᵀH) and AᵀB = Σ_tokens h ∘ (B W_2)."""

    def __init__(self, W_2, kept):
        self.W = W_2.detach()[:, kept]  # (d, k)
        self.kept = kept
        self.gram = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=W_2.device)
        self.ATB = torch.zeros(len(kept), dtype=torch.float64, device=W_2.device)

    def add_batch(self, hidden, residual, target):
        H = hidden[:, self.kept.to(hidden.device)]
        self.gram += (H.T @ H).double()
        self.ATB += ((target - residual) @ self.W).double().mul_(H.double()).sum(dim=0)

    def system(self):
        W = self.W.double()
        return (self.gram * (W.T @ W)).cpu().numpy(), self.ATB.cpu().numpy()
