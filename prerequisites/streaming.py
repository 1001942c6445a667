"""Models larger than the host's memory: each layer's weights stay in the checkpoint's files
until the layer's turn (--low_memory).

`load_streamed` builds the model with every layer empty (tensors on the meta device: shapes,
no memory) and only what lies outside the layers (embeddings, final norm, LM head) in memory.
A `LayerStore` then gives the layer-by-layer runtime (prerequisites/layerwise.py, `each_layer`)
one layer at a time: `fetch` maps its tensors from the safetensors files (a tensor's pages are
read when first touched and let go with the tensor), `release` writes the layer to a file of its
own when it has changed (pruned, quantized) and empties it again. Host memory therefore holds one
layer, the calibration activations and the embeddings, never the model.

`LayerStore.save` writes the finished model as the same pruned checkpoint that
prerequisites/checkpoint.py's `save_pruned` writes (config with the recorded shapes and
`auto_map`, modeling_stat.py, tokenizer), its weights sharded one file per layer plus one for
the rest, with the usual `model.safetensors.index.json`: it loads with `load_model` and with
`from_pretrained(..., trust_remote_code=True)` exactly as the in-memory path's checkpoint does.
Like `save_pruned`, it writes the whole checkpoint or nothing (utils/atomic.py).
"""
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prerequisites.adapters import adapter_for
from prerequisites.checkpoint import finish_checkpoint, load_config, mark_pruned, model_class, tied_duplicates
from utils.atomic import atomic_folder
from utils.errors import UserError

INDEX_FILE = "model.safetensors.index.json"


class WeightFiles:
    """The tensors of a checkpoint folder's safetensors files, by name, each mapped from its file
    when asked for."""

    def __init__(self, folder):
        index = os.path.join(folder, INDEX_FILE)
        self.file_of = {}
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.file_of = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            path = os.path.join(folder, "model.safetensors")
            with safe_open(path, framework="pt") as f:
                self.file_of = {name: path for name in f.keys()}
        if not self.file_of:
            raise UserError(f"--low_memory reads the weights from safetensors files, and {folder} has none "
                            f"(model.safetensors or {INDEX_FILE})")

    def read(self, names):
        """{name: tensor} of these tensors, memory-mapped (nothing is read until touched)."""
        by_file = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
        return out


def checkpoint_names(files, model):
    """{model state key: name in the files}: the same, or (checkpoints saved from the base model,
    like facebook/opt-*'s `decoder.…`) without the base model's prefix."""
    prefix = model.base_model_prefix + "." if model.base_model_prefix else None
    names = {}
    for key in model.state_dict():
        if key in files.file_of:
            names[key] = key
        elif prefix and key.startswith(prefix) and key[len(prefix):] in files.file_of:
            names[key] = key[len(prefix):]
    return names


def tied_names(model):
    """The names under which a parameter seen under an earlier name appears again (tied weights)."""
    seen, tied = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return tied


def load_streamed(path, folder, dtype=None):
    """(model, LayerStore): a checkpoint folder's model with its layers left in the files (see the
    module docstring). `folder`: where the store writes the layers that change."""
    config = load_config(path)
    with torch.device("meta"):
        model = model_class(config)(config)
    adapter = adapter_for(model)
    files = WeightFiles(path)
    tied = tied_names(model)  # before the tensors get memory of their own below
    inside = {id(module) for layer in adapter.layers(model) for module in layer.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module.to_empty(device="cpu", recurse=False)
    # what from_pretrained does for the tensors no file holds (rotary frequencies): the layers
    # are on the meta device, where initialisation costs nothing
    model.initialize_weights()

    names = checkpoint_names(files, model)
    layer_prefixes = tuple(name + "." for name in adapter.layer_names(model))
    outside = [key for key in model.state_dict() if not key.startswith(layer_prefixes)]
    missing = [key for key in model.state_dict() if key not in names and key not in tied]
    ignored = re.compile("|".join(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ["$^"]))
    unexpected = sorted(name for name in set(files.file_of) - set(names.values()) if not ignored.search(name))
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    tensors = files.read(names[key] for key in outside if key in names)
    model.load_state_dict({key: tensors[names[key]] for key in outside if key in names}, strict=False, assign=True)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    store = LayerStore(model, adapter, files, names, folder, dtype or model.dtype)
    return model.eval(), store


class LayerStore:
    """Where each layer of a streamed model lives between its turns: the checkpoint's files, or
    once it has changed, a file of its own in `folder` (see the module docstring)."""

    def __init__(self, model, adapter, files, names, folder, dtype):
        self.model = model
        self.files, self.names = files, names
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.dtype = dtype
        self.layers = adapter.layers(model)
        self.prefixes = [name + "." for name in adapter.layer_names(model)]
        self.written = {}  # layer index -> the file holding its current weights
        self.nbytes = {}  # layer index -> bytes of its tensors, as written

    def layer_tensors(self, index):
        """{model state key: tensor} of one layer's current weights, mapped from their file."""
        if index in self.written:
            with safe_open(self.written[index], framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        else:
            keys = [key for key in self.names if key.startswith(self.prefixes[index])]
            mapped = self.files.read(self.names[key] for key in keys)
            tensors = {key: mapped[self.names[key]] for key in keys}
        return {key: t.to(self.dtype) if t.is_floating_point() else t for key, t in tensors.items()}

    def fetch(self, index):
        """Give layer `index` its weights (on the CPU)."""
        prefix = self.prefixes[index]
        state = {key[len(prefix):]: t for key, t in self.layer_tensors(index).items()}
        self.layers[index].load_state_dict(state, strict=True, assign=True)

    def release(self, index, changed=False):
        """Empty layer `index` again, after writing its weights to its own file when they changed."""
        if changed:
            self._write(index, self.written.get(index) or os.path.join(self.folder, f"layer-{index:05d}.safetensors"))
        self.layers[index].to("meta")

    def _write(self, index, path):
        state = {self.prefixes[index] + key: t.detach().cpu().contiguous()
                 for key, t in self.layers[index].state_dict().items()}
        temporary = path + ".tmp"
        save_file(state, temporary, metadata={"format": "pt"})
        os.replace(temporary, path)
        self.written[index] = path
        self.nbytes[index] = sum(t.numel() * t.element_size() for t in state.values())

    def state_dict(self):
        """The model's state dict with every layer's tensors mapped from its file."""
        state = {key: t for key, t in self.model.state_dict().items() if not key.startswith(tuple(self.prefixes))}
        for index in range(len(self.layers)):
            state.update(self.layer_tensors(index))
        return state

    def save(self, path, tokenizer=None):
        """Write the model as a pruned checkpoint, one layer at a time (see the module docstring),
        whole or not at all (utils/atomic.py). The layers are read from there afterwards: the files
        of those already written move there from the store's folder (a checkpoint saved before
        keeps its own); should the save fail, the store is as it was."""
        count = len(self.layers) + 1
        shards = ["model-{:05d}-of-{:05d}.safetensors".format(number, count) for number in range(1, count + 1)]
        before = dict(self.written), dict(self.nbytes)
        try:
            with atomic_folder(path) as folder:
                self._save_into(folder, shards, tokenizer)
        except BaseException:
            self.written, self.nbytes = before
            raise
        # the old names go only now: until the checkpoint is in place, they are the only copy
        for source in before[0].values():
            if os.path.samefile(os.path.dirname(source), self.folder):
                os.remove(source)
        self.written = {index: os.path.join(path, shards[index]) for index in range(len(self.layers))}

    def _save_into(self, folder, shards, tokenizer):
        weight_map = {}
        for index in range(len(self.layers)):
            target = os.path.join(folder, shards[index])
            if index in self.written:
                _link(self.written[index], target)
            else:  # never changed: copied from the checkpoint, in the run's dtype
                self.fetch(index)
                self._write(index, target)
                self.release(index)
            with safe_open(target, framework="pt") as f:
                weight_map.update({key: shards[index] for key in f.keys()})
        rest = {key: t for key, t in self.model.state_dict().items() if not key.startswith(tuple(self.prefixes))}
        rest = {key: t.detach().cpu().contiguous() for key, t in rest.items() if key not in tied_duplicates(rest)}
        save_file(rest, os.path.join(folder, shards[-1]), metadata={"format": "pt"})
        weight_map.update({key: shards[-1] for key in rest})
        total = sum(self.nbytes.values()) + sum(t.numel() * t.element_size() for t in rest.values())
        with open(os.path.join(folder, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)

        mark_pruned(self.model)
        self.model.config.dtype = str(self.dtype).removeprefix("torch.")
        self.model.config.save_pretrained(folder)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(folder)
        finish_checkpoint(folder, tokenizer)


def _link(source, target):
    # a second name costs neither time nor space (pipelines/decoder.py puts the store's folder
    # beside --save_model for this); across file systems it takes a copy
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
