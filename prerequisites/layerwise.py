"""Running a model one layer at a time: the runtime that pruning, quantization and perplexity share.

The inputs of the first layer are captured for every batch (`capture_inputs`); then each
layer in turn is moved to the device alone (`move_to`), run over all batches (`run_layer`,
whose outputs replace the inputs in place and become the next layer's inputs), and put back
(`restore`). Only one layer and the batches' hidden states are on the device at a time, which
is what lets a model larger than the device prune, quantize and evaluate on it.

`each_layer` runs that loop for its callers. With a LayerStore (prerequisites/streaming.py,
--low_memory) the layers are empty between their turns: each is read from disk for its turn
and, when the caller changes it, written back, so host memory holds one layer, not the model.

Model-agnostic: it asks an adapter (prerequisites/adapters/) for the layers, the modules that
run before the first layer, and the extra forward arguments; it knows no module names.
"""
import ctypes
import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class LayerInputs:
    """What the current layer receives, for every batch (replaced by its outputs as it runs)."""

    hidden: list  # (B, S, d) per batch
    extras: list  # the layer's other arguments per batch (attention mask, positions)
    masks: list  # (B, S) bool per batch, True for real tokens; None when there is no padding


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
    return LayerInputs(hidden, extras, masks)


def each_layer(model, adapter, device, store=None, changes=False, desc=None, progress=True, leave=True):
    """Yield (index, layer) for every layer from the bottom, each alone on `device` while it is
    yielded (with a progress bar). With `store`, the layer's weights are fetched from disk for
    its turn and emptied after it, written back first when `changes` (the caller prunes or
    quantizes them)."""
    for index, layer in enumerate(tqdm(adapter.layers(model), desc=desc, disable=not progress, leave=leave)):
        if store is not None:
            store.fetch(index)
        moved = move_to([layer], device)
        yield index, layer
        if store is None:
            restore(moved)
        else:  # straight from the device to the file: no copy back to the CPU first
            store.release(index, changed=changes)
            release_memory()


def run_layer(layer, inputs):
    """Replace every batch's hidden states by the layer's outputs (the next layer's inputs)."""
    for b, (x, extras) in enumerate(zip(inputs.hidden, inputs.extras)):
        out = layer(x, **extras)
        inputs.hidden[b] = out[0] if isinstance(out, tuple) else out


def move_to(modules, device):
    """Move the modules that are elsewhere to `device`; returns what `restore` needs."""
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
