"""Perplexity under the GPTQ protocol, computed layer by layer (docs/design.md §6).

The test text is tokenized once and cut into non-overlapping windows of the model's context
(the tail is dropped); perplexity = exp(mean over windows of the window's mean token NLL).
Running one layer at a time over all windows keeps only one layer (and the windows' hidden
states) on the device, so large models evaluate in small memory, as they prune.
"""
import torch
import torch.nn.functional as F
from dataset.lm import window_batches
from prerequisites.layerwise import capture_inputs, each_layer, move_to, restore, run_layer


@torch.no_grad()
def window_nlls(model, adapter, windows, device, batch_size=1, progress=True, desc="perplexity", store=None):
    """Mean next-token NLL of each window (windows: LongTensor (n, seqlen)), layer by layer
    (`store`: a LayerStore, when the layers live on disk between their turns)."""
    batches = window_batches(windows, batch_size)
    inputs = capture_inputs(model, adapter, batches, device)
    for _, layer in each_layer(model, adapter, device, store, desc=desc, progress=progress, leave=False):
        run_layer(layer, inputs)
    moved = move_to(adapter.post_layer_modules(model), device)
    nlls = []
    for x, batch in zip(inputs.hidden, batches):
        # One window at a time through the head: a window's logits (seqlen x vocab floats) are
        # the largest tensor of the whole evaluation, so a batch of them would set the peak.
        for hidden, tokens in zip(x, batch["input_ids"]):
            logits = adapter.logits(model, hidden[None, :-1])[0].float()
            nlls.append(F.cross_entropy(logits, tokens[1:].to(logits.device)).cpu())
    restore(moved)
    return torch.stack(nlls)


def perplexity(model, adapter, windows, device, batch_size=1, progress=True, desc="perplexity", store=None):
    return float(torch.exp(window_nlls(model, adapter, windows, device, batch_size, progress, desc, store).mean()))
