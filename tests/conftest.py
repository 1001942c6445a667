import os
import sys

import pytest

# Tests never reach a hub: tiny models come from configs, data from files the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny checkpoints of tiny.CHECKPOINTS, saved once for the whole run: name -> folder.
    Read them; a test that changes a checkpoint saves its own copy."""
    import tiny

    return tiny.build_checkpoints(str(tmp_path_factory.mktemp("tiny-checkpoints")))
