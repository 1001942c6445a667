"""Loading dense checkpoints and saving/loading pruned ones (DESIGN.md §5).

A pruned checkpoint is a `save_pretrained` directory whose config.json also records each
layer's head count (`stat_heads`, in units: heads, or KV groups) and FFN width (`stat_ffn`),
plus an `auto_map` entry pointing to `modeling_stat.py`, a copy of prerequisites/adapters.py
saved next to the weights. It therefore loads two ways:
- here, with `load_model(dir)`: the Stat* class builds the stock model from the config,
  shrinks each layer to its recorded shape, and the weights are loaded strictly;
- anywhere, with `AutoModelFor...from_pretrained(dir, trust_remote_code=True)`.
"""
import json
import os
import re
import shutil

import torch
import transformers
from safetensors import SafetensorError

from prerequisites import adapters
from utils.cli import UserError

MODELING_FILE = "modeling_stat.py"


def record_shapes(model, adapter):
    layers = adapter.layers(model)
    model.config.stat_heads = [adapter.n_units(layer) for layer in layers]
    model.config.stat_ffn = [adapter.n_neurons(layer) for layer in layers]


def stat_class_of(model):
    for stock, (stat_class, auto_name) in adapters.STAT_CLASSES.items():
        if isinstance(model, stock):
            return stat_class, auto_name
    raise ValueError(f"saving a pruned {type(model).__name__} is not supported")


def save_pruned(model, path, tokenizer=None):
    """Write a pruned model so that it reloads with its per-layer shapes."""
    adapter = adapters.adapter_for(model)
    record_shapes(model, adapter)
    stat_class, auto_name = stat_class_of(model)
    model.config.auto_map = {auto_name: f"modeling_stat.{stat_class.__name__}"}
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    shutil.copyfile(adapters.__file__, os.path.join(path, MODELING_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _model_class(config):
    """The stock class config.json names, or its pruned twin when the config records shapes."""
    architecture = (config.architectures or [None])[0]
    if not (architecture and hasattr(transformers, architecture)):
        raise UserError(f"cannot tell which model class to build: config.json names {architecture!r}")
    stock = getattr(transformers, architecture)
    if getattr(config, "stat_heads", None) is None:
        return stock
    if stock not in adapters.STAT_CLASSES:
        raise UserError(f"pruned checkpoints of {architecture} are not supported")
    return adapters.STAT_CLASSES[stock][0]


def load_config(path):
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the config of {path}: {' '.join(str(err).split())}")


def load_model(path, dtype=None, device="cpu"):
    """Load a dense or pruned checkpoint (a folder, or a hub id in the local cache); every
    weight must match (strict). A quantized checkpoint (quantize/storage.py) loads dequantized."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"not a checkpoint (no config.json): {path}")
    if not os.path.isdir(path) and not re.fullmatch(r"[\w-]+/[\w.-]+", path):
        raise UserError(f"checkpoint not found: {path}")
    config = load_config(path)
    try:
        if getattr(config, "stat_quantization", None) is not None:
            from quantize.storage import load_quantized  # imported here: quantize.storage imports this module

            return load_quantized(path, dtype, device, config)
        model_class = _model_class(config)
        model, info = model_class.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except (OSError, SafetensorError) as err:  # no weights file, or a truncated one
        raise UserError(f"cannot load checkpoint {path}: {' '.join(str(err).split())}")
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise UserError(f"checkpoint {path} does not match its config: {problems}")
    return own_memory(model).to(device).eval()


@torch.no_grad()
def own_memory(model):
    """Copy the weights out of the memory-mapped checkpoint file into the process's memory.

    from_pretrained maps safetensors files, so the weights stay backed by the file for as long
    as any of them (say, the embeddings) lives. Pruning replaces layers and the layer-by-layer
    pipeline moves them to the device and back: with the mapping alive, the process would hold
    the dense file's pages and the new weights, up to twice the model.
    """
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data = tensor.data.clone()
    return model


def load_tokenizer(path):
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {err}")
