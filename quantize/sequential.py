"""Quantize every linear layer of a transformer, layer by layer, as GPTQ does for OPT and Llama.

The layers are processed from the bottom. Each one is moved to the device alone and run over
all calibration batches, with hooks feeding the inputs of its linears to their GPTQ objects;
its linears are then quantized, and the layer is run again, now quantized, to produce the
inputs of the next layer. Every layer is therefore calibrated on what the quantized layers
below it really output, and only one layer and the calibration activations are on the device
at a time (the memory bound of the pruning pipeline).

Inside a layer all linears see the inputs of the layer as it was before any of them was
quantized (one pass, as in the published OPT code), unless `true_sequential`: then, as the
reference's `--true-sequential` (its Llama script), the linears are quantized group by group in
the order they run (Q/K/V, the attention output, the FFN input side, the FFN output), each
group calibrated on a pass of the layer whose earlier groups are already quantized.
Only the linears inside the layers are quantized: embeddings, norms and the LM head stay float.
Round-to-nearest (`nearest=True`) needs no data and skips the calibration passes.
"""
import dataclasses

import torch
from prerequisites.layerwise import capture_inputs, each_layer, run_layer
from quantize.gptq import GPTQ, rtn_quantize
from quantize.pack import QuantizedWeight


def quantized_linears(model, adapter):
    """(full module name, module) of every linear the quantization covers, layer by layer."""
    out = []
    for layer_name, layer in zip(adapter.layer_names(model), adapter.layers(model)):
        for group in adapter.linear_groups(layer):
            out.extend((f"{layer_name}.{path}", adapter.get(layer, path)) for path in group)
    return out


@torch.no_grad()
def quantize_model(model, adapter, batches, device, wbits, groupsize=-1, sym=False, act_order=False,
                   percdamp=0.01, nearest=False, reference=False, true_sequential=False, progress=True, store=None):
    """Quantize the linears of every layer in place (GPTQ, or RTN when `nearest`).

    reference: GPTQ (and RTN's grid) as the reference implementation does it (quantize/gptq.py).

    `batches` yields dicts of model inputs (input_ids, attention_mask...); unused when `nearest`.
    Returns {full module name ('model.layers.3.self_attn.q_proj'): QuantizedWeight}; a module's
    state_dict prefix is its name plus '.'. The model's weights become the dequantized ones
    (with `store`, a LayerStore: written back to disk layer by layer).
    """
    model.eval()
    names = adapter.layer_names(model)
    inputs = None if nearest else capture_inputs(model, adapter, list(batches), device)
    quantized = {}
    for index, layer in each_layer(model, adapter, device, store, changes=True, desc="quantize", progress=progress):
        layer_name = names[index]
        paths = [path for group in adapter.linear_groups(layer) for path in group]
        if nearest:
            results = {path: rtn_quantize(adapter.get(layer, path), wbits, groupsize, sym, reference)
                       for path in paths}
        else:
            groups = adapter.linear_groups(layer) if true_sequential else [paths]
            results = {}
            for group in groups:
                results.update(_gptq_layer(adapter, layer, group, inputs, wbits, groupsize, sym, act_order, percdamp,
                                           reference))
            # The next layer is calibrated on the outputs of this one as quantized.
            run_layer(layer, inputs)
        for path, result in results.items():
            quantized[f"{layer_name}.{path}"] = _on_cpu(QuantizedWeight.from_result(result))
    return quantized


def _gptq_layer(adapter, layer, paths, inputs, wbits, groupsize, sym, act_order, percdamp, reference=False):
    """One pass of the layer (as it is now) over all batches to collect the inputs of the linears
    named in `paths`, then GPTQ on each."""
    gptq = {path: GPTQ(adapter.get(layer, path), reference) for path in paths}
    current = {}  # the padding mask of the batch being run, read by the hooks

    def hook_for(path):
        def hook(_module, inputs, _output):
            gptq[path].add_batch(inputs[0], current["mask"])
        return hook

    handles = [adapter.get(layer, path).register_forward_hook(hook_for(path)) for path in paths]
    try:
        for x, extras, mask in zip(inputs.hidden, inputs.extras, inputs.masks):
            current["mask"] = mask
            layer(x, **extras)
    finally:
        for handle in handles:
            handle.remove()
    results = {}
    for path in paths:
        results[path] = gptq[path].quantize(wbits, groupsize, sym, act_order, percdamp)
        gptq[path].free()
    return results


def _on_cpu(weight):
    """The packed weight kept on the CPU, like the layers between their turns on the device."""
    g_idx = None if weight.g_idx is None else weight.g_idx.cpu()
    return dataclasses.replace(weight, qweight=weight.qweight.cpu(), qzeros=weight.qzeros.cpu(),
                               scales=weight.scales.cpu(), g_idx=g_idx)
