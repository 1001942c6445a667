"""Loading dense checkpoints, and saving and loading pruned ones (docs/design.md §5).

A pruned checkpoint is a `save_pretrained` directory whose config.json also records each
layer's unit counts (`stat_heads`, in attention units: heads, or KV groups; `stat_ffn`) and the
shapes of its modules (`stat_layout`), plus an `auto_map` entry pointing to `modeling_stat.py`,
a copy of prerequisites/modeling_stat.py saved next to the weights. It loads two ways:
- here, with `load_model(dir)`: the Stat* class builds the stock model from the config,
  reshapes it to the recorded layout, and the weights are loaded strictly;
- anywhere, with `AutoModelFor...from_pretrained(dir, trust_remote_code=True)`.

Checkpoints written before `stat_layout` existed record only `stat_heads`/`stat_ffn`: their
layout is rebuilt from those counts by the family's adapter.

Other storage formats (packed quantized weights, quantize/storage.py) plug in through
`CheckpointFormat`: `load_model(path, formats=...)` hands a checkpoint to the first format that
recognises its config, so this module never needs to know them.
"""
import json
import os
import re
import shutil
from typing import Callable, NamedTuple

import torch
import transformers
from safetensors import SafetensorError

from prerequisites import modeling_stat
from prerequisites.adapters import adapter_for
from utils.atomic import atomic_folder
from utils.errors import UserError

MODELING_FILE = "modeling_stat.py"


class CheckpointFormat(NamedTuple):
    """A storage format that `load_model` can hand a checkpoint to."""

    recognizes: Callable  # (config) -> bool
    load: Callable  # (path, config, dtype, device) -> model


def stat_class_of(stock_class):
    """(the reshapable twin of a stock model class, the Auto class that loads it)."""
    for stock, (stat_class, auto_name) in modeling_stat.STAT_CLASSES.items():
        if issubclass(stock_class, stock):
            return stat_class, auto_name
    raise UserError(f"pruned checkpoints of {stock_class.__name__} are not supported")


def stock_class_of(model):
    """The stock transformers class a (possibly reshaped) model is an instance of."""
    for stock in modeling_stat.STAT_CLASSES:
        if isinstance(model, stock):
            return stock
    raise UserError(f"pruned checkpoints of {type(model).__name__} are not supported")


def record_shapes(model, config):
    """Write the model's per-layer unit counts and module layout into `config`."""
    adapter = adapter_for(model)
    config.stat_heads, config.stat_ffn = adapter.shape(model)
    config.stat_layout = adapter.layout(model)


def mark_pruned(model):
    """Put into the model's config what a pruned checkpoint's config.json records: the shapes,
    the stock architecture, and the `auto_map` entry that points to modeling_stat.py."""
    record_shapes(model, model.config)
    stock = stock_class_of(model)
    stat_class, auto_name = stat_class_of(stock)
    model.config.architectures = [stock.__name__]
    model.config.auto_map = {auto_name: f"modeling_stat.{stat_class.__name__}"}


def finish_checkpoint(path, tokenizer=None):
    """What a pruned checkpoint holds besides its config and weights: modeling_stat.py, the tokenizer."""
    shutil.copyfile(modeling_stat.__file__, os.path.join(path, MODELING_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_pruned(model, path, tokenizer=None):
    """Write a pruned model so that it reloads with its per-layer shapes; whole or not at all
    (utils/atomic.py: a checkpoint already at `path` is replaced only once the new one is complete)."""
    mark_pruned(model)
    with atomic_folder(path) as folder:
        model.save_pretrained(folder)
        name_stock_class(folder, model)
        finish_checkpoint(folder, tokenizer)


def name_stock_class(path, model):
    """save_pretrained names the model's own class in config.json; a model loaded from a pruned
    checkpoint is the reshapable twin (StatLlamaForCausalLM...), which model_class cannot find
    in transformers: the checkpoint names the stock class, as mark_pruned set it."""
    config_file = os.path.join(path, "config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    stock = stock_class_of(model).__name__
    if config.get("architectures") != [stock]:
        config["architectures"] = [stock]
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")


def tied_duplicates(state):
    """Keys whose tensor is the same memory as an earlier key's (tied weights, e.g. the LM head)."""
    seen, duplicates = set(), set()
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":  # these all share address 0 without being tied
            continue
        identity = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if identity in seen:
            duplicates.add(key)
        seen.add(identity)
    return duplicates


def model_class(config):
    """The class that builds this config's model: the stock class config.json names, or its
    reshapable twin when the config records shapes (the layout is completed first for
    checkpoints that record only unit counts)."""
    architecture = (config.architectures or [None])[0]
    if not (architecture and hasattr(transformers, architecture)):
        raise UserError(f"cannot tell which model class to build: config.json names {architecture!r}")
    stock = getattr(transformers, architecture)
    if getattr(config, "stat_heads", None) is None:
        return stock
    stat_class = stat_class_of(stock)[0]
    if getattr(config, "stat_layout", None) is None:
        config.stat_layout = _layout_from_counts(stock, config)
    return stat_class


def _layout_from_counts(stock, config):
    """The layout of a checkpoint that records only stat_heads/stat_ffn: the stock model built
    on the meta device (no memory), each layer resized by its adapter, read back."""
    with torch.device("meta"):
        model = stock(config)
    adapter = adapter_for(config)
    layers = adapter.layers(model)
    heads, ffn = config.stat_heads, config.stat_ffn
    if not (len(heads) == len(ffn) == len(layers)):
        raise UserError(f"config records {len(heads)} head counts and {len(ffn)} FFN widths for {len(layers)} layers")
    for layer, n_units, n_neurons in zip(layers, heads, ffn):
        adapter.resize_layer(layer, n_units, n_neurons)
    return adapter.layout(model)


def load_config(path):
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the config of {path}: {' '.join(str(err).split())}")


def load_model(path, dtype=None, device="cpu", formats=()):
    """Load a dense or pruned checkpoint (a folder, or a hub id in the local cache); every
    weight must match (strict). `formats`: other storage formats to recognise (CheckpointFormat)."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"not a checkpoint (no config.json): {path}")
    if not os.path.isdir(path) and not re.fullmatch(r"[\w-]+/[\w.-]+", path):
        raise UserError(f"checkpoint not found: {path}")
    config = load_config(path)
    try:
        for fmt in formats:
            if fmt.recognizes(config):
                return fmt.load(path, config, dtype, device)
        model, info = model_class(config).from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
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


# The files whose contents are a checkpoint's weights and shapes (not its tokenizer or docs).
IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")
IDENTITY_SKIP = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                 "added_tokens.json", "generation_config.json")


def checkpoint_identity(path):
    """What identifies a checkpoint folder's weights without reading them: [name, size, mtime in
    ns] of its weight files and config (files reached through a link, as in a hub cache, are
    described by their target). Any rewrite of the weights changes it."""
    entries = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(IDENTITY_SUFFIXES) and name not in IDENTITY_SKIP and os.path.isfile(full):
            stat = os.stat(full)
            entries.append([name, stat.st_size, stat.st_mtime_ns])
    return entries


def load_tokenizer(path):
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {err}")
