"""Quantized checkpoints: packed integer codes on disk, dequantized weights in memory.

A quantized checkpoint is a folder with
- config.json: the model's config, plus the per-layer shapes a pruned checkpoint records
  (`stat_heads`, `stat_ffn`, so a pruned model rebuilds with its own shapes) and
  `stat_quantization`: the quantization settings, the float dtype of the other tensors and the
  names of the quantized modules;
- stat_quantized.safetensors: every tensor of the state dict except the quantized weights
  (biases, norms, embeddings, the LM head, in the model's dtype; a tied tensor once), and for
  each quantized module `<name>.qweight`, `.qzeros`, `.scales`, `.qmeta` (and `.g_idx`), the
  packed layout of quantize/pack.py. No float copy of a quantized weight is stored;
- the tokenizer files, when a tokenizer is given.

The weights file deliberately does not have the name `from_pretrained` looks for: a stock
loader would otherwise leave the quantized weights randomly initialised. Load with
`load_quantized(dir)`, or `prerequisites.checkpoint.load_model(dir, formats=[QUANTIZED])`,
which hands it here.
"""
import copy
import os

import torch
from safetensors.torch import load_file, save_file

from prerequisites.checkpoint import CheckpointFormat, load_config, model_class, record_shapes, stock_class_of, \
    tied_duplicates
from quantize.pack import QuantizedWeight, quantized_prefixes
from utils.atomic import atomic_folder
from utils.errors import UserError

WEIGHTS_FILE = "stat_quantized.safetensors"


def save_quantized(model, quantized, path, tokenizer=None, settings=None, store=None):
    """Write `model` with the modules named in `quantized` ({name: QuantizedWeight}) packed.

    `settings` (e.g. wbits, groupsize, sym, act_order, nearest, percdamp) is recorded in the
    config as it is. The model's weights must be the dequantized ones (as quantize_model leaves
    them; with `store`, a LayerStore, the layers' are read from its files).
    """
    state = model.state_dict() if store is None else store.state_dict()
    for name in quantized:
        if name + ".weight" not in state:
            raise ValueError(f"{name} is not a module with a weight in this model")
        del state[name + ".weight"]
    tensors = {key: t.detach().cpu().contiguous() for key, t in state.items() if key not in tied_duplicates(state)}
    for name, weight in quantized.items():
        tensors.update(weight.to_state(name + "."))

    # A copy, so saving leaves the model's own config as it was.
    config = copy.deepcopy(model.config)
    config.architectures = [stock_class_of(model).__name__]
    record_shapes(model, config)
    config.stat_quantization = {
        **(settings or {}),
        "dtype": str(model.dtype).removeprefix("torch."),
        "modules": sorted(quantized),
    }
    # No modeling_stat.py is written (remote code could not read the packed weights).
    config.__dict__.pop("auto_map", None)

    with atomic_folder(path) as folder:  # whole or not at all: utils/atomic.py
        config.save_pretrained(folder)
        save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def is_quantized(config):
    return getattr(config, "stat_quantization", None) is not None


def load_quantized(path, dtype=None, device="cpu", config=None):
    """Rebuild a model saved by save_quantized: float tensors loaded strictly, quantized weights
    dequantized from their codes (bit for bit the weights the quantizer wrote, in the saved dtype).

    `dtype` casts the whole model afterwards (default: the dtype it was saved in); `config`, when
    the caller has read it already.
    """
    if config is None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"not a checkpoint (no config.json): {path}")
        config = load_config(path)
    if not is_quantized(config):
        raise UserError(f"{path} is not a quantized checkpoint (its config has no stat_quantization)")
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise UserError(f"quantized checkpoint without its weights: {weights_path} is missing")
    info = config.stat_quantization
    modules = info["modules"]

    state = load_file(weights_path)
    stored = quantized_prefixes(state)
    if stored != sorted(name + "." for name in modules):
        raise UserError(f"{weights_path} holds packed weights for {stored}, its config lists {modules}")
    packed = {}
    for name in modules:
        packed[name] = QuantizedWeight.from_state(state, name + ".")
        for key in packed[name].to_state(name + "."):
            del state[key]

    # Built in float32 (the random initial weights are all overwritten below); the float
    # tensors convert exactly into it and are cast back to the saved dtype at the end.
    model = model_class(config)(config).float()
    allowed_missing = {name + ".weight" for name in modules} | tied_duplicates(model.state_dict())
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape that does not match the config
        raise UserError(f"checkpoint {path} does not match its config: {err}")
    if result.unexpected_keys or set(result.missing_keys) != allowed_missing - set(state):
        raise UserError(f"checkpoint {path} does not match its config: missing "
                        f"{sorted(set(result.missing_keys) - allowed_missing)}, unexpected {result.unexpected_keys}")
    with torch.no_grad():
        for name, weight in packed.items():
            linear = model.get_submodule(name)
            if tuple(linear.weight.shape) != weight.shape:
                raise UserError(f"checkpoint {path}: {name} is {tuple(linear.weight.shape)} in the config, "
                                f"{weight.shape} in the packed weights")
            linear.weight.copy_(weight.dequantize(linear.weight.dtype))
    dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    return model.to(device=device, dtype=dtype).eval()


QUANTIZED = CheckpointFormat(recognizes=is_quantized,
                             load=lambda path, config, dtype, device: load_quantized(path, dtype, device, config))


def weights_size_mb(path):
    """Size on disk of a checkpoint folder's weight files (*.safetensors, *.bin), in MiB."""
    total = 0
    for name in os.listdir(path):
        if name.endswith((".safetensors", ".bin")):
            total += os.path.getsize(os.path.join(path, name))  # follows the hub cache's symlinks
    return total / 2**20
