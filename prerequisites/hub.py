"""Checkpoints named by a local folder or a Hugging Face hub id: one resolver for every script.

`resolve_checkpoint(name)` returns a local folder that holds the checkpoint's files:
- a folder called `name` wins (a local `facebook/opt-125m/` shadows the hub id);
- otherwise `name` must be a hub id (`org/model`, or a legacy `bert-base-uncased`):
  - online, its config, tokenizer files and one copy of its PyTorch weights (the safetensors
    files when the repository has any, else pytorch_model*.bin; never the TensorFlow, Flax,
    ONNX... copies) are downloaded into the Hugging Face cache, and the cache's snapshot folder
    is returned (a second call downloads nothing);
  - with HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), the snapshot folder already in the cache
    is returned, and a checkpoint the cache lacks is a one-line error that says so.
The cache is huggingface_hub's (HF_HUB_CACHE, HF_HOME); gated repositories need `hf auth login`.
"""
import os

from utils.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
LEGACY_WEIGHT_SUFFIXES = (".bin", ".bin.index.json")
# config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, vocab.txt, vocab.json, merges.txt, sentencepiece models...
SMALL_FILE_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")


def resolve_checkpoint(name, what="checkpoint", cache_dir=None):
    """A local folder with the files of `name` (a folder, or a hub id); see the module docstring.

    cache_dir: the Hugging Face cache to use (default: huggingface_hub's, from the environment).
    """
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise UserError(f"{what} not found: {name}")
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
        folder = cached_folder(name, cache_dir)
        if folder is None:
            raise UserError(f"{what} {name} is neither a local folder nor in the local Hugging Face cache, "
                            f"and the hub is offline (HF_HUB_OFFLINE=1)")
        return folder
    return _download(name, what, cache_dir)


def is_hub_id(name):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_folder(name, cache_dir=None):
    """The snapshot folder of hub id `name` in the local cache (the one its `main` ref points
    to), or None when the cache holds no config.json for it."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    return os.path.dirname(config) if isinstance(config, str) else None


def files_to_fetch(repo_files):
    """Which of a model repository's files a PyTorch checkpoint needs: the small top-level files
    (config, tokenizer) and one format of weights, safetensors preferred. Empty when the
    repository has no PyTorch weights at all."""
    top = [f for f in repo_files if "/" not in f]
    weights = [f for f in top if f.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        weights = [f for f in top if f.startswith("pytorch_model") and f.endswith(LEGACY_WEIGHT_SUFFIXES)]
    if not weights:
        return []
    small = [f for f in top if f.endswith(SMALL_FILE_SUFFIXES) and not f.endswith(LEGACY_WEIGHT_SUFFIXES)]
    return sorted(set(weights) | set(small))


def _download(name, what, cache_dir):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = files_to_fetch(HfApi().list_repo_files(name))
        if not files:
            raise UserError(f"{what} {name}: the hub repository has no PyTorch weights "
                            f"(model*.safetensors or pytorch_model*.bin)")
        return snapshot_download(name, allow_patterns=files, cache_dir=cache_dir)
    except GatedRepoError:
        raise UserError(f"{what} {name} is gated on the Hugging Face hub: accept its terms on huggingface.co, "
                        f"then log in (hf auth login)")
    except RepositoryNotFoundError:
        raise UserError(f"{what} {name} is neither a local folder nor a model on the Hugging Face hub")
    except UserError:
        raise
    except Exception as err:  # no network, hub down, disk full...: the cache may still hold it
        folder = cached_folder(name, cache_dir)
        if folder is not None:
            return folder
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot download {what} {name} from the Hugging Face hub ({reason}), "
                        f"and the local cache does not hold it")
